"""Keep the process off the network: pivotfuse never downloads and never reports usage.

`force_offline` runs first thing in `cli.main` (and in the tests' conftest). It overrides whatever
the user's environment says, because `HF_HUB_OFFLINE=0` in a shell profile would otherwise let
TRL's trainer telemetry (`huggingface_hub.utils.send_telemetry`, sent on every `SFTTrainer`
init) and any Hub lookup of a mistyped model name reach huggingface.co. Stdlib only, so
`--help` stays fast.
"""

from __future__ import annotations

import os
import sys

# huggingface_hub: HF_HUB_OFFLINE (every Hub request, and telemetry) and HF_HUB_DISABLE_TELEMETRY
# (telemetry, and `telemetry/off` in the user agent); TRANSFORMERS_OFFLINE is the older name
# huggingface_hub still reads; datasets reads HF_DATASETS_OFFLINE *instead of* HF_HUB_OFFLINE
# when it is set, so `HF_DATASETS_OFFLINE=0` must not survive either.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def force_offline() -> None:
    """Set `OFFLINE_ENV` for this process (and its children), whatever was set before.

    huggingface_hub and datasets read these variables once, at import: when they were imported
    before this call (a caller of `cli.main`, a test session), their flags are set as well.
    """
    os.environ.update(OFFLINE_ENV)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
        hub.HF_HUB_DISABLE_TELEMETRY = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True
