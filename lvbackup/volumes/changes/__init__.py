"""Change tracking: what LVM says changed since a backup's parent, as repository block runs.

`tracker` chooses how a backup finds what changed (`plan()`); `ranges` turns changed ranges
(in a thin pool's data blocks or a snapshot's COW chunks) into a block map; `thin` parses
thin_delta / thin_dump output; `cow` reads a classic snapshot's exception store. Nothing
here runs a command: lvm.py does that. Any doubt about what the tools or the kernel reported
is an errors.ChangeTrackingError, on which the caller falls back to reading the whole volume.
"""
