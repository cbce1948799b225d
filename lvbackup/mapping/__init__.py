"""Mapping a backup as a block device: nbdkit serves it (`server.py`, loaded by
`nbdkit_plugin.py`), the kernel's NBD client attaches it (`nbd.py`), `registry.py` records
what is mapped and by which live process, `mounts.py` mounts what is on it."""
