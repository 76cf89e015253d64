"""Device profiles: one TOML per device (data with cited sources) plus the strict loader.

`load_profile("raspberry-pi-5")` or `load_profile("my/device.toml")`; `"host"` measures this
machine once (llmpareto.evaluators.host) and caches the result.
"""

from llmpareto.device_profiles.loader import (
    HOST,
    dump_toml,
    list_profiles,
    load_profile,
    profile_dir,
)
from llmpareto.device_profiles.schema import DeviceProfile, profile_from_dict

__all__ = [
    "HOST",
    "DeviceProfile",
    "dump_toml",
    "list_profiles",
    "load_profile",
    "profile_dir",
    "profile_from_dict",
]
