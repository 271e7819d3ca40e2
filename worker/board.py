"""TensorBoard event files of one attempt, beside its log in the bucket:
`<bucket>/jobs/<job_id>/tensorboard/attempt-<N>/events.out.tfevents.*`.

The loop writes `train/loss` and `train/learning_rate` for every optimizer step, the text
trainer `eval/loss` when the job holds out a validation set, and the image trainer its sample
grids (`samples`) as images. Events go to a file in the attempt's work folder (tensorboardX's
synchronous `EventsWriter`: no writer thread, no queue), and that file is uploaded with every
checkpoint and once more when the attempt ends, failed or not. A killed worker loses what it
wrote since its last checkpoint: acceptable, the events are a view of the run, not its state
(the loss history that resume needs is in the checkpoint).

Writing events draws no random number and touches neither the model nor the adapter folder,
so exact resume and reproducible adapter bytes are unchanged. Each attempt has its own folder,
which TensorBoard shows as its own run; a resumed attempt writes the steps after its checkpoint.
"""

from __future__ import annotations

import logging
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorajobs.storage.backends import open_storage
from lorajobs.storage.base import join_uri

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


def samples_uri(output_uri: str, job_id: str) -> str:
    """Where sample grids go the moment they are rendered: `<bucket>/jobs/<job_id>/samples`
    (`step-NNNNNN.png`), so the dashboard shows them during training, not only at the end."""
    return join_uri(output_uri, "jobs", job_id, "samples")


def board_uri(output_uri: str, job_id: str, attempt: int) -> str:
    """Where an attempt's event files go: `<bucket>/jobs/<job_id>/tensorboard/attempt-<N>`."""
    return join_uri(output_uri, "jobs", job_id, "tensorboard", f"attempt-{attempt}")


class Board:
    """One attempt's event file: write scalars and images, upload it to `uri`."""

    def __init__(
        self, local_dir: Path, uri: str, mirror: Any = None, samples: str | None = None
    ) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        local_dir.mkdir(parents=True, exist_ok=True)
        self.dir, self.uri = local_dir, uri
        # The job's MLflow run (`lorajobs.worker.tracking.MlflowRun`), when there is one: it
        # gets every scalar too, and is flushed with each upload.
        self.mirror = mirror
        self.samples = samples  # where each sample grid is also put as a PNG, at once
        self._writer: Any = EventsWriter(str(local_dir / "events"))
        self._closed = False
        self._written = 0  # events since the file's header: a board with none uploads nothing

    @classmethod
    def for_attempt(
        cls, local_dir: Path, output_uri: str, job_id: str, attempt: int, mirror: Any = None
    ) -> Board:
        """The board of attempt `attempt` of `job_id`, writing under `local_dir`."""
        return cls(
            local_dir,
            board_uri(output_uri, job_id, attempt),
            mirror,
            samples_uri(output_uri, job_id),
        )

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Record `value` of the series `tag` at `step`."""
        from tensorboardX import summary

        self._write(summary.scalar(tag, float(value)), step)
        if self.mirror is not None:
            self.mirror.scalar(tag, value, step)

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        """Record an RGB image (a sample grid) under `tag` at `step`."""
        import numpy as np
        from tensorboardX import summary

        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        self._write(summary.image(tag, pixels, dataformats="HWC"), step)
        if self.samples is not None:
            self._put_png(image, f"step-{step:06d}.png")

    def _put_png(self, image: Image.Image, name: str) -> None:
        import io

        try:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            open_storage(self.samples).put_bytes(buf.getvalue(), name)  # type: ignore[arg-type]
        except Exception as err:  # noqa: BLE001 - a view: never fail the attempt for it
            log.warning("sample grid %s not uploaded: %s", name, err)

    def upload(self) -> None:
        """Flush the event file and upload it (the whole file: it is small next to a
        checkpoint); never raise: a lost event file must not fail the attempt."""
        if self.mirror is not None:
            self.mirror.flush()
        if self._closed or not self._written:
            return
        try:
            self._writer.flush()
            storage = open_storage(self.uri)
            for path in sorted(self.dir.iterdir()):
                if path.is_file() and path.name.startswith("events.out.tfevents."):
                    storage.put_file(path, path.name)
        except Exception as err:  # noqa: BLE001 - the events are a view: never fail for them
            log.warning("TensorBoard events not uploaded to %s: %s", self.uri, err)

    def close(self) -> None:
        """A last upload, then close the file; later writes are ignored."""
        if self._closed:
            return
        self.upload()
        self._closed = True
        self._writer.close()

    def _write(self, summary: Any, step: int) -> None:
        if self._closed:
            return
        from tensorboardX.proto.event_pb2 import Event

        try:
            self._writer.write_event(Event(wall_time=time.time(), step=step, summary=summary))
            self._written += 1
        except OSError as err:  # a full disk: training goes on without its events
            log.warning("TensorBoard events no longer written: %s", err)
            self._closed = True


def read_events(data: bytes) -> list[Any]:
    """The `Event` protos of an event file's bytes (TFRecord framing: length, its CRC, the
    record, its CRC; the CRCs are not checked). For tests and tools."""
    from tensorboardX.proto.event_pb2 import Event

    events, pos = [], 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        start = pos + 12
        if start + length + 4 > len(data):
            break  # a record cut short (the file was copied mid-write)
        events.append(Event.FromString(data[start : start + length]))
        pos = start + length + 4
    return events


def scalars(events: list[Any]) -> dict[str, list[tuple[int, float]]]:
    """`{tag: [(step, value), ...]}` of the scalar summaries among `events`, in file order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
