"""Write the configuration tables of README.md from the settings dataclasses.

    python docs/config_tables.py

tests/settings/test_config_tables.py fails when README.md and the dataclasses disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autoglm_settings import markdown_table, replace_block  # noqa: E402
from gateway.config import ENV_PREFIX as GATEWAY_PREFIX  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from inference_svc.config import ENV_PREFIX as SERVER_PREFIX  # noqa: E402
from inference_svc.config import ServerConfig  # noqa: E402
from memory_daemon.config import ENV_PREFIX as MEMD_PREFIX  # noqa: E402
from memory_daemon.config import DaemonConfig  # noqa: E402

README = ROOT / "README.md"
COMMAND = "python docs/config_tables.py"


def with_tables(text: str) -> str:
    """`text` (the README) with every generated table as the dataclasses say."""
    text = replace_block(text, "autoglm-server", markdown_table(ServerConfig, SERVER_PREFIX))
    text = replace_block(text, "autoglm-gateway", markdown_table(GatewayConfig, GATEWAY_PREFIX))
    return replace_block(text, "autoglm-memd",
                         markdown_table(DaemonConfig, MEMD_PREFIX, file_keys=True))


def main() -> None:
    README.write_text(with_tables(README.read_text()))


if __name__ == "__main__":
    main()
