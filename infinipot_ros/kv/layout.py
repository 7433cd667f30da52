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
from typing import Any

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

    def pop_last(self) -> None:
        """Undo the last append (used when a prefill fails half-way)."""
        rec = self._records.pop()
        self._next_chunk_id -= 1
        self._next_token_id -= rec.chunk.num_tokens
        self._lookup = None

    def prune(self, live_token_ids: torch.Tensor) -> int:
        """Drop chunks none of whose tokens is in ``live_token_ids``; returns how many."""
        if not self._records:
            return 0
        live_chunks = set(self.chunk_index(live_token_ids.flatten().unique()).tolist())
        kept = [r for i, r in enumerate(self._records) if i in live_chunks]
        dropped = len(self._records) - len(kept)
        if dropped:
            self._records = kept
            self._lookup = None
        return dropped

    def _tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._lookup is None or self._lookup["first"].device != device:
            recs = self._records
            self._lookup = {
                "first": torch.tensor([r.first_token_id for r in recs], dtype=torch.long, device=device),
                "grid_w": torch.tensor([r.chunk.grid_w for r in recs], dtype=torch.long, device=device),
                "camera": torch.tensor([r.chunk.camera for r in recs], dtype=torch.long, device=device),
                "stamp": torch.tensor([r.chunk.stamp_ns for r in recs], dtype=torch.long, device=device),
                "end_stamp": torch.tensor([r.chunk.end_stamp_ns for r in recs], dtype=torch.long, device=device),
                "chunk_id": torch.tensor([r.chunk_id for r in recs], dtype=torch.long, device=device),
            }
        return self._lookup

    def chunk_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Index into :attr:`records` of the chunk holding each token id (same shape)."""
        first = self._tables(token_ids.device)["first"]
        return torch.searchsorted(first, token_ids.contiguous(), right=True) - 1

    def layout(self, token_ids: torch.Tensor, recent_ratio: float = 0.0) -> "VisionLayout":
        """Per-token source information for a [B, H_kv, S] tensor of token ids."""
        t = self._tables(token_ids.device)
        ci = self.chunk_index(token_ids)
        first = t["first"][ci]
        grid_w = t["grid_w"][ci]
        local = token_ids - first
        return VisionLayout(
            chunk=ci,
            chunk_id=t["chunk_id"][ci],
            row=torch.div(local, grid_w, rounding_mode="floor"),
            col=local % grid_w,
            camera=t["camera"][ci],
            stamp_ns=t["stamp"][ci],
            end_stamp_ns=t["end_stamp"][ci],
            records=self._records,
        )


@dataclass
class VisionLayout:
    """Source of every vision token in one layer's cache, all tensors [B, H_kv, S] int64.

    Attributes:
        chunk: index into ``records`` (0 = oldest chunk still in the table).
        chunk_id: stream-wide sequential chunk id (temporal order).
        row, col: spatial index on the chunk's merged grid.
        camera: camera index.
        stamp_ns, end_stamp_ns: header stamps of the chunk's frames (ns).
        records: the chunk table rows ``chunk`` indexes.
    """

    chunk: torch.Tensor
    chunk_id: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    camera: torch.Tensor
    stamp_ns: torch.Tensor
    end_stamp_ns: torch.Tensor
    records: list[ChunkRecord]

    def spatial_key(self) -> torch.Tensor:
        """[B, H_kv, S] int64 id of (camera, row, col): equal ids = same place in the image."""
        return (self.camera << 40) | (self.row << 20) | self.col

    def recent_mask(self, recent_ratio: float) -> torch.Tensor:
        """[B, H_kv, S] bool: tokens of the most recent frames, per camera.

        The number of recent chunks per camera is r = max(1, round(recent_ratio
        * S_cam / p_cam)): recent_ratio of the camera's cached tokens counted in
        (pseudo-)frames of p_cam tokens, p_cam the size of its newest chunk
        (InfiniPot-V Sec. 4.2: r = 1/8 of the frames in the cache).
        """
        mask = torch.zeros_like(self.chunk, dtype=torch.bool)
        # Token counts are equal in every (batch, head) row; use the first row.
        cams = self.camera[0, 0]
        chunk_ids = self.chunk_id[0, 0]
        for cam in cams.unique().tolist():
            in_cam = cams == cam
            s_cam = int(in_cam.sum())
            newest = int(chunk_ids[in_cam].max())
            p_cam = self.records[int(self.chunk[0, 0][in_cam][chunk_ids[in_cam] == newest][0])].chunk.num_tokens
            r = max(1, round(recent_ratio * s_cam / p_cam))
            cam_chunk_ids = chunk_ids[in_cam].unique()  # sorted ascending
            threshold = cam_chunk_ids[max(0, cam_chunk_ids.numel() - r)]
            mask |= (self.camera == cam) & (self.chunk_id >= threshold)
        return mask
