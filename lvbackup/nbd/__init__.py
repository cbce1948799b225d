"""A backup served as a block device: nbdkit serves it (`server.py`, loaded by
`nbdkit_plugin.py`), `devices.py` runs nbdkit, the kernel's NBD client and mounts,
`registry.py` records what is mapped and by which live process; an instant restore's export
(`instant_export.py`) fills an LV through `hydrate.py`'s region map while it serves it."""
