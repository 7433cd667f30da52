"""Where every cached vision token came from: chunk table and per-token layout.

A *chunk* is what one prefill appends: the vision tokens of one temporal patch
(Qwen2.5-VL: two frames of one camera) after the 2x2 spatial merge, laid out
row-major on a grid_h x grid_w grid. Every vision token gets a global id when
its chunk is appended; the cache stores, per layer and KV head, the id of the
token held in each slot. From the id we recover the source chunk, the spatial
index (row, col), the camera and the header stamp, which is what TaR compares
and what answer-time filtering (camera, since/until) needs (InfiniPot-V
Sec. 4.2, "track the source of every kept token").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch


@dataclass(frozen=True)
class VisionChunk:
    """One temporal patch of vision tokens as appended to the cache.

    Attributes:
        grid_h: rows of the merged token grid.
        grid_w: columns of the merged token grid; num_tokens = grid_h * grid_w.
        camera: camera index (the engine maps camera names to indices).
        stamp_ns: header stamp of the first frame of the patch (ROS time, ns).
        end_stamp_ns: header stamp of the last frame of the patch (ROS time, ns).
        num_frames: camera frames in the patch (Qwen2.5-VL: 2).
        meta: model-specific data kept with the chunk (e.g. its M-RoPE
            temporal position); opaque to the KV layer.
    """

    grid_h: int
    grid_w: int
    camera: int = 0
    stamp_ns: int = 0
    end_stamp_ns: int = 0
    num_frames: int = 1
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.grid_h <= 0 or self.grid_w <= 0:
            raise ValueError(f"chunk grid must be positive, got {self.grid_h}x{self.grid_w}")
        if self.end_stamp_ns < self.stamp_ns:
            object.__setattr__(self, "end_stamp_ns", self.stamp_ns)

    @property
    def num_tokens(self) -> int:
        return self.grid_h * self.grid_w

    def selected_by(self, cameras: Optional[Sequence[int]] = None, since_ns: int = 0, until_ns: int = 0) -> bool:
        """True if the chunk's camera is in ``cameras`` (None = any) and its frames
        overlap [since_ns, until_ns] (header stamps, ns; 0 = open end)."""
        return (
            (cameras is None or self.camera in cameras)
            and (since_ns <= 0 or self.end_stamp_ns >= since_ns)
            and (until_ns <= 0 or self.stamp_ns <= until_ns)
        )


@dataclass
class ChunkRecord:
    """A chunk as the cache knows it: the chunk plus its ids."""

    chunk: VisionChunk
    chunk_id: int  # sequential over the stream, never reused
    first_token_id: int  # global id of its token at (row 0, col 0)


class ChunkTable:
    """Append-only (with pruning) table mapping global token ids to chunks.

    Chunks are contiguous in token-id space and appended in stream order, so
    a token id is resolved with one searchsorted over the chunks' first ids.
    """

    def __init__(self) -> None:
        self._records: list[ChunkRecord] = []
        self._next_chunk_id = 0
        self._next_token_id = 0
        self._lookup: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self._records)

    @property
    def records(self) -> list[ChunkRecord]:
        return list(self._records)

    @property
    def next_token_id(self) -> int:
        return self._next_token_id

    def append(self, chunk: VisionChunk) -> ChunkRecord:
        rec = ChunkRecord(chunk, self._next_chunk_id, self._next_token_id)
        self._records.append(rec)
        self._next_chunk_id += 1
        self._next_token_id += chunk.num_tokens
        self._lookup = None
        return rec

    def prune(self, live_token_ids: torch.Tensor) -> int:
        """Drop chunks none of whose tokens is in ``live_token_ids``; returns how many (one host sync)."""
        if not self._records:
            return 0
        present = torch.bincount(self.chunk_index(live_token_ids.reshape(-1)), minlength=len(self._records))
        alive = (present > 0).tolist()
        kept = [r for r, a in zip(self._records, alive) if a]
        dropped = len(self._records) - len(kept)
        if dropped:
            self._records = kept
            self._lookup = None
        return dropped

    def _tables(self, device: torch.device) -> dict:
        """Per-record lookup tensors (on ``device``) and host-side grid facts, rebuilt when the table changes."""
        if self._lookup is None or self._lookup["first"].device != device:
            recs = self._records
            cams = sorted({r.chunk.camera for r in recs})
            slot = {c: i for i, c in enumerate(cams)}
            counts = [0] * len(cams)
            t_local = []
            for r in recs:
                k = slot[r.chunk.camera]
                t_local.append(counts[k])
                counts[k] += 1

            def col(values):
                return torch.tensor(values, dtype=torch.long, device=device)

            self._lookup = {
                "first": col([r.first_token_id for r in recs]),
                "grid_w": col([r.chunk.grid_w for r in recs]),
                "camera": col([r.chunk.camera for r in recs]),
                "slot": col([slot[r.chunk.camera] for r in recs]),
                "t_local": col(t_local),
                "stamp": col([r.chunk.stamp_ns for r in recs]),
                "end_stamp": col([r.chunk.end_stamp_ns for r in recs]),
                "chunk_id": col([r.chunk_id for r in recs]),
                # host-side: per camera slot, frames cached and the largest grid
                "frames_per_slot": counts,
                "grid_per_slot": [
                    (max(r.chunk.grid_h for r in recs if r.chunk.camera == c),
                     max(r.chunk.grid_w for r in recs if r.chunk.camera == c)) for c in cams
                ],
            }
        return self._lookup

    def chunk_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Index into :attr:`records` of the chunk holding each token id (same shape)."""
        first = self._tables(token_ids.device)["first"]
        return torch.searchsorted(first, token_ids.contiguous(), right=True) - 1

    def layout(self, token_ids: torch.Tensor) -> "VisionLayout":
        """Per-token source information for a [N, H_kv, S] tensor of token ids (N = batch x layers)."""
        t = self._tables(token_ids.device)
        ci = self.chunk_index(token_ids)
        local = token_ids - t["first"][ci]
        grid_w = t["grid_w"][ci]
        return VisionLayout(
            chunk=ci,
            chunk_id=t["chunk_id"][ci],
            row=torch.div(local, grid_w, rounding_mode="floor"),
            col=local % grid_w,
            camera=t["camera"][ci],
            camera_slot=t["slot"][ci],
            t_local=t["t_local"][ci],
            stamp_ns=t["stamp"][ci],
            end_stamp_ns=t["end_stamp"][ci],
            records=self._records,
            frames_per_slot=list(t["frames_per_slot"]),
            grid_per_slot=list(t["grid_per_slot"]),
        )


@dataclass
class VisionLayout:
    """Source of every cached vision token, tensors [N, H_kv, S] int64 (N = batch x layers).

    Attributes:
        chunk: index into ``records`` (0 = oldest chunk still in the table).
        chunk_id: stream-wide sequential chunk id (temporal order).
        row, col: spatial index on the chunk's merged grid.
        camera: camera index; camera_slot: dense index of the camera among those cached.
        t_local: order of the token's chunk among its camera's cached chunks (time axis).
        stamp_ns, end_stamp_ns: header stamps of the chunk's frames (ns).
        records: the chunk table rows ``chunk`` indexes.
        frames_per_slot, grid_per_slot: host-side, per camera slot: cached chunks and
            the largest (rows, cols) grid, so scorers size dense grids without a device sync.
    """

    chunk: torch.Tensor
    chunk_id: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    camera: torch.Tensor
    camera_slot: torch.Tensor
    t_local: torch.Tensor
    stamp_ns: torch.Tensor
    end_stamp_ns: torch.Tensor
    records: list
    frames_per_slot: list
    grid_per_slot: list

    def spatial_index(self) -> tuple[torch.Tensor, int]:
        """([N, H_kv, S] dense id of (camera, row, col), number of ids): equal ids = same place in the image."""
        offsets, total = [], 0
        for h, w in self.grid_per_slot:
            offsets.append(total)
            total += h * w
        widths = torch.tensor([w for _, w in self.grid_per_slot], dtype=torch.long, device=self.row.device)
        offs = torch.tensor(offsets, dtype=torch.long, device=self.row.device)
        return offs[self.camera_slot] + self.row * widths[self.camera_slot] + self.col, total

    def recent_mask(self, recent_ratio: float) -> torch.Tensor:
        """[N, H_kv, S] bool: tokens of the most recent frames, per camera (see :meth:`recent_selection`)."""
        return self.recent_selection(recent_ratio)[0]

    def recent_selection(self, recent_ratio: float) -> tuple[torch.Tensor, int]:
        """Tokens of the most recent frames, per camera: ([N, H_kv, S] bool mask, tokens per head).

        The number of recent chunks per camera is r = max(1, round(recent_ratio
        * S_cam / p_cam)): recent_ratio of the camera's cached tokens counted in
        (pseudo-)frames of p_cam tokens, p_cam the size of its newest chunk
        (InfiniPot-V Sec. 4.2: r = 1/8 of the frames in the cache). Recent
        chunks are kept whole by every head and layer, so tokens are counted on
        row [0, 0] (one host sync per call) and the count is the chunks' size.
        """
        n_slots = len(self.grid_per_slot)
        tokens_per_slot = torch.bincount(self.camera_slot[0, 0], minlength=n_slots).tolist()
        per_cam: dict = {}
        for rec in self.records:  # stream order: the last record of a camera is its newest
            per_cam.setdefault(rec.chunk.camera, []).append(rec)
        threshold, n_tokens = [], 0
        for k, cam in enumerate(sorted(per_cam)):
            recs = per_cam[cam]
            r = max(1, round(recent_ratio * tokens_per_slot[k] / recs[-1].chunk.num_tokens))
            threshold.append(recs[max(0, len(recs) - r)].chunk_id)
            n_tokens += sum(rec.chunk.num_tokens for rec in recs[-r:])
        thr = torch.tensor(threshold, dtype=torch.long, device=self.chunk_id.device)
        return self.chunk_id >= thr[self.camera_slot], n_tokens
