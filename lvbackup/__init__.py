"""lvbackup: back up LVM logical volumes and their snapshots, full and incremental."""

__version__ = "0.1.0"
