"""The NBD export of an instant restore, as nbdkit's Python plugin runs it (`export=instant`):
the restored volume (`hydrate.Hydrator` over the LV and the backup), a background thread
that hydrates it, and, once every region is in the LV, the switch: the user's
device-mapper device is given a linear table onto the LV under its feet (suspend, load,
resume; a filesystem on it stays mounted), the NBD device is detached and nbdkit exits,
after removing the device as well if nothing holds it open (`release_device`, which
`restore --release` and `restore --status` run too).

    nbdkit python .../nbdkit_plugin.py ... export=instant repository=... cache_dir=DIR \
        backup=ID lock=FILE state=<cache_dir>/instant/<name>.json config=FILE
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .. import events as ev
from .. import lvm, metrics
from ..base.errors import LvbackupError
from ..base.faults import crash_point
from ..base.timeutil import now_iso
from ..datapath.reader import BackupReader
from . import devices
from . import registry as reg
from .hydrate import (
    Hydrator,
    RegionBitmap,
    hydrated_bytes,
    load_state,
    regions_of,
    regions_path,
    save_state,
)
from .server import Export, RequestFailed

log = logging.getLogger(__name__)

READY_POLL = 0.2   # seconds between looks at the record while `restore` finishes its setup
# Seconds the helper waits after the switch before it removes a device nobody opened: the
# time for whoever asked for a small restore to open the device `restore` printed.
RELEASE_GRACE = 10.0


class InstantExport(Export):
    PARAMETERS = (*Export.PARAMETERS, "state")
    writable = True

    def get_ready(self) -> None:
        """Take the map's lock, open the backup (Export), then the state, the region map,
        the LV, and the configuration's events and metrics."""
        super().get_ready()
        assert self.reader is not None
        self.state_file = Path(self.params["state"])
        self.state = load_state(self.state_file)
        st = self.state
        if st["backup_id"] != self.params["backup"] or st["size"] != self.reader.size:
            raise LvbackupError(f"{self.state_file} is the restore of backup {st['backup_id']}"
                                f" ({st['size']} bytes), not of {self.params['backup']}")
        self.regions = RegionBitmap(regions_path(self.state_file),
                                 regions_of(st["size"], st["region_size"]))
        self.fd = os.open(st["target"], os.O_RDWR | os.O_CLOEXEC)
        if os.lseek(self.fd, 0, os.SEEK_END) < st["size"]:
            raise LvbackupError(f"{st['target']} is smaller than the backup")
        # Hydration reads each region once: its own reader, caching nothing, so that it
        # never pushes the user's blocks out of the serving reader's cache.
        bulk = BackupReader(self.reader.repo, self.reader.manifest, 0)
        self.hydrator = Hydrator(self.fd, self.regions, st["size"], st["region_size"],
                                 self.reader.read, bulk.read, st["fresh"])
        config = self.settings
        assert config is not None
        self.events = ev.Events(config.event_log, config.hooks)
        self.metrics_file = config.metrics
        self.lock_dir = config.lock_dir
        self._stop = threading.Event()
        self._reported = self._percent()

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        self._request(lambda: self.hydrator.pread(buf, offset))

    def pwrite(self, buf: memoryview | bytes, offset: int) -> None:
        self._request(lambda: self.hydrator.pwrite(buf, offset))

    def flush(self) -> None:
        self.hydrator.flush()

    @staticmethod
    def _request(call: Callable[[], None]) -> None:
        try:
            call()
        except LvbackupError as e:   # a damaged block of the backup: EIO, never other data
            raise RequestFailed(5, str(e)) from None

    def after_fork(self, shutdown: Callable[[], None]) -> None:
        super().after_fork(shutdown)
        self._shutdown = shutdown
        threading.Thread(target=self._background, name="hydrate", daemon=True).start()

    # --- the background copy and the switch --------------------------------------------

    def _payload(self, **extra) -> dict:
        return {**self.state["backup"], "target": self.state["volume"],
                "device": self.state["device"], "instant": True, **extra}

    def _percent(self) -> int:
        total = self.state["size"]
        done = hydrated_bytes(self.regions, total, self.state["region_size"])
        return done * 100 // total if total else 100

    def _progress(self) -> None:
        percent = self._percent()
        if percent // ev.PROGRESS_STEP > self._reported // ev.PROGRESS_STEP:
            self._reported = percent
            self.events.emit(ev.RESTORE_PROGRESS, self._payload(percent=percent))
            self._record_metrics()

    def _record_metrics(self) -> None:
        st = self.state
        done = hydrated_bytes(self.regions, st["size"], st["region_size"])
        metrics.best_effort(self.metrics_file, ev.stderr_warning, lambda path: (
            metrics.record_hydration(path, self.lock_dir, st["volume"], hydrated=done,
                                     total=st["size"])))

    def _background(self) -> None:
        try:
            if self.hydrator.run(self._stop, self.state["rate"], self._progress):
                self._switch(self._wait_ready())
        except Exception as e:  # noqa: BLE001 - reported in the state, the log and an event
            message = str(e) or type(e).__name__
            # In nbdkit's log (its stderr), where no handler is set up: logging's last resort.
            log.error("lvbackup: instant restore onto %s stopped: %s", self.state["volume"],
                      message)
            self.state["error"] = message
            with contextlib.suppress(OSError):
                save_state(self.state_file, self.state)
            self.events.emit(ev.RESTORE_ERROR, self._payload(reason=message))

    def _wait_ready(self) -> reg.MapRecord:
        """The map's record once `restore` has set everything up (the device-mapper device
        exists): only then may its table be swapped."""
        map_id = Path(self.params["lock"]).stem
        while True:
            record = next((r for r in reg.records(self.lock_dir) if r["map_id"] == map_id),
                          None)
            if record is None:
                raise LvbackupError("the instant restore's record is gone")
            if record["ready"]:
                return record
            time.sleep(READY_POLL)

    def _settle(self) -> None:
        """With the device suspended (nothing in flight through nbdkit): every write made
        through the LV's page cache on its disk, and that cache dropped, since the device
        will read the LV below it from now on."""
        os.fdatasync(self.fd)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _switch(self, record: reg.MapRecord) -> None:
        st = self.state
        lvm.dm_swap(st["dm_name"], lvm.linear_table(st["target"], st["size"]), self._settle)
        st["done_at"], st["error"] = now_iso(), None
        save_state(self.state_file, st)
        self.events.emit(ev.RESTORE_END, self._payload())
        self._record_metrics()
        with reg.registry(self.lock_dir):
            device = record["device"]
            if device and devices.is_attached(device):
                devices.detach(device)
            reg.remove(self.lock_dir, record["map_id"])
        shutil.rmtree(record["run_dir"], ignore_errors=True)
        time.sleep(RELEASE_GRACE)
        with contextlib.suppress(LvbackupError, OSError), reg.registry(self.lock_dir):
            release_device(self.state_file)   # unless it is open: then --release, later
        self._shutdown()


def release_device(state_file: Path) -> bool:
    """Remove the device of a finished instant restore (the LV is used under its own name
    from then on), unless something holds it open; whether it is gone. Call under the
    registry lock."""
    state = load_state(state_file)
    if state.get("released_at"):
        return True
    name = state["dm_name"]
    opened = lvm.dm_open_count(name)
    if opened:
        return False
    if opened is not None:
        try:
            expected: str | None = lvm.linear_table(state["target"], state["size"])
        except OSError:   # the LV is gone
            expected = None
        if lvm.dm_table(name) != expected:
            raise LvbackupError(f"/dev/mapper/{name} does not map {state['volume']} as the "
                                "finished restore left it; lvbackup leaves it alone")
        lvm.dm_remove(name)
        crash_point("instant-released")
    state["released_at"] = now_iso()
    save_state(state_file, state)
    return True
