"""Settings: one frozen dataclass per process is its whole configuration.

Fields declared with `setting()` carry their help; from the dataclass come the flags
(`add_arguments`), the environment variables (`from_environment`), the documentation
table (`markdown_table`), and the validated value (`build` over the merged sources).
Standard library only, so every process of the project can use it.
"""

from autoglm_settings.declare import (
    MIB,
    Setting,
    SettingError,
    Unit,
    check_choices,
    section,
    setting,
    settings,
)
from autoglm_settings.docs import markdown_table, replace_block
from autoglm_settings.sources import (
    add_arguments,
    build,
    deprecated_names,
    from_environment,
    from_flags,
    load,
    merge,
)

__all__ = [
    "MIB", "Setting", "SettingError", "Unit", "add_arguments", "build", "check_choices",
    "deprecated_names", "from_environment", "from_flags", "load", "markdown_table", "merge",
    "replace_block", "section", "setting", "settings",
]
