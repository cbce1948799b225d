"""The LVM side: what a backup reads and a restore writes, and what changed in between.

`lvm` is the only module that runs LVM and device-mapper commands; `sources` (a device,
an LV, a snapshot) and `targets` (a file, stdout, a device, an LV) build on it; `changes/`
turns what LVM records of changes into block maps.
"""
