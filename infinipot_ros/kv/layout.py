"""Where every cached vision token came from: chunk table and per-token layout.

A *chunk* is what one prefill appends: the vision tokens of one temporal patch
(Qwen2.5-VL: two frames of one camera) after the 2x2 spatial merge, laid out
row-major on a grid_h x grid_w grid. Every vision token gets a global id when
its chunk is appended; the cache stores, per layer and KV head, the id of the
token held in each slot. From the id we recover the source chunk, the spatial
index (row, col), the camera and the header stamp, which is what TaR compares
and what answer-time filtering (camera, since/until) needs (InfiniPot-V
Sec. 4.2, "track the source of every kept token").

A chunk may also be *text* (a note: an operator remark, a transcript, a
detector label): :data:`NOTE_CAMERA` as its camera, ``num_frames`` 0, its
tokens on a 1 x k "grid". Text has no spatial place and no temporal
neighbour, so every note is its own slot (never compared with a frame or
another note by TaR, never pooled across by VaN) and never part of the
recent window; camera filters at answer time do not hide notes (they are
not any camera's), time windows do.

The table is columnar (CPU int64 tensor columns, one entry per chunk that
still has a token in some layer or head): appends, pruning and every query
are vectorised, no Python object is kept per chunk, and the device-side
lookup is one host-to-device copy per change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

#: Camera index of text chunks (notes); camera indices of frames are >= 0.
NOTE_CAMERA = -1


@dataclass(frozen=True)
class VisionChunk:
    """One temporal patch of vision tokens as appended to the cache.

    Attributes:
        grid_h: rows of the merged token grid.
        grid_w: columns of the merged token grid; num_tokens = grid_h * grid_w.
        camera: camera index (the engine maps camera names to indices); :data:`NOTE_CAMERA` for text.
        stamp_ns: header stamp of the first frame of the patch (ROS time, ns).
        end_stamp_ns: header stamp of the last frame of the patch (ROS time, ns).
        num_frames: camera frames in the patch (Qwen2.5-VL: 2); 0 for text.
        position: first (for M-RoPE: temporal) position id of the chunk's tokens.
        max_position: largest position id any of its tokens uses (text
            after the video continues at max_position + 1).
    """

    grid_h: int
    grid_w: int
    camera: int = 0
    stamp_ns: int = 0
    end_stamp_ns: int = 0
    num_frames: int = 1
    position: int = 0
    max_position: int = 0

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
        overlap [since_ns, until_ns] (header stamps, ns; 0 = open end).
        :meth:`ChunkTable.select` is the same rule over the whole table."""
        one = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
        return bool(_select(one(self.camera), one(self.stamp_ns), one(self.end_stamp_ns), cameras, since_ns, until_ns)[0])


def _select(camera: torch.Tensor, stamp: torch.Tensor, end_stamp: torch.Tensor,
            cameras: Optional[Sequence[int]], since_ns: int, until_ns: int) -> torch.Tensor:
    """The one chunk-selection rule (camera in ``cameras``, frames overlapping [since, until]; notes pass any
    camera filter)."""
    ok = torch.ones(camera.shape, dtype=torch.bool)
    if cameras is not None:
        ok &= torch.isin(camera, torch.tensor(list(cameras), dtype=torch.long)) | (camera == NOTE_CAMERA)
    if since_ns > 0:
        ok &= end_stamp >= since_ns
    if until_ns > 0:
        ok &= stamp <= until_ns
    return ok


@dataclass(frozen=True)
class ChunkRecord:
    """A snapshot of one table row, for inspection (hot paths read the columns)."""

    chunk: VisionChunk
    chunk_id: int  # sequential over the stream, never reused
    first_token_id: int  # global id of its token at (row 0, col 0)
    row0_tokens: int  # tokens of this chunk held by layer 0, batch 0, KV head 0


#: Columns of the chunk table (int64 each, CPU).
TABLE_COLUMNS = ("first", "grid_h", "grid_w", "camera", "stamp", "end_stamp", "num_frames", "chunk_id",
                 "position", "max_position", "row0_tokens")
_COL = {name: i for i, name in enumerate(TABLE_COLUMNS)}

#: Columns of :attr:`ChunkLookup.table`, in order.
LOOKUP_COLUMNS = ("first", "grid_h", "grid_w", "slot", "t_local", "place_offset", "place_width",
                  "chunk_id", "camera", "stamp", "end_stamp")


class ChunkLookup:
    """Per-record facts as device tensors, built once per change of the chunk table.

    Everything a scorer needs to place a token id, with no host synchronisation:

    * ``table``: [len(LOOKUP_COLUMNS), R] int64; each column name is also an
      attribute ([R] view), e.g. ``lookup.first``, ``lookup.grid_w``. ``slot``
      is the camera's dense index among the cached cameras, ``t_local`` the
      record's order among its camera's records (the time axis of VaN
      pooling), ``place_offset``/``place_width`` map (row, col) to a dense place
      id ``place_offset + row * place_width + col`` shared by all chunks of the
      camera (TaR compares tokens at the same place).
    * ``by_slot_time``: [n_slots, T] int64 record index at (camera slot, t_local), -1 past a camera's end.
    * host-side: ``n_records``, ``n_slots``, ``n_places``, ``frames_per_slot``,
      ``grid_per_slot`` (largest (rows, cols) per slot), and CPU copies ``slot_cpu`` / ``t_local_cpu``.
      Every note (camera :data:`NOTE_CAMERA`) is a slot of its own.

    Built with vectorised CPU tensor ops and sent with one host-to-device copy.
    """

    def __init__(self, cols: dict, device: torch.device) -> None:
        camera, grid_h, grid_w = cols["camera"], cols["grid_h"], cols["grid_w"]
        n = camera.shape[0]
        # one slot per camera, and one per note (keys below -1 never collide with cameras)
        key = torch.where(camera == NOTE_CAMERA, -2 - cols["chunk_id"], camera)
        cams, slot = torch.unique(key, sorted=True, return_inverse=True)
        n_slots = cams.shape[0]
        counts = torch.bincount(slot, minlength=n_slots)
        starts = torch.cumsum(counts, 0) - counts
        order = torch.sort(slot, stable=True).indices  # records grouped by camera, stream order kept
        t_local = torch.empty(n, dtype=torch.long)
        t_local[order] = torch.arange(n) - starts[slot[order]]
        gh = torch.zeros(n_slots, dtype=torch.long).scatter_reduce_(0, slot, grid_h, reduce="amax")
        gw = torch.zeros(n_slots, dtype=torch.long).scatter_reduce_(0, slot, grid_w, reduce="amax")
        sizes = gh * gw
        offsets = torch.cumsum(sizes, 0) - sizes
        t_max = int(counts.max()) if n_slots else 0
        by_slot_time = torch.full((n_slots, t_max), -1, dtype=torch.long)
        by_slot_time[slot, t_local] = torch.arange(n)
        table = torch.stack([cols["first"], grid_h, grid_w, slot, t_local, offsets[slot], gw[slot], cols["chunk_id"],
                             camera, cols["stamp"], cols["end_stamp"]])
        packed = torch.cat([table.reshape(-1), by_slot_time.reshape(-1)]).to(device)
        self.device = torch.device(device)
        self.n_records = n
        self.n_slots = n_slots
        self.n_places = int(sizes.sum())
        self.frames_per_slot = counts.tolist()
        self.grid_per_slot = list(zip(gh.tolist(), gw.tolist()))
        self.slot_cpu, self.t_local_cpu = slot, t_local
        k = len(LOOKUP_COLUMNS) * n
        self.table = packed[:k].view(len(LOOKUP_COLUMNS), n)
        self.by_slot_time = packed[k:].view(n_slots, t_max)
        for i, name in enumerate(LOOKUP_COLUMNS):
            setattr(self, name, self.table[i])


class ChunkTable:
    """Columnar table mapping global token ids to the chunks that still have tokens cached.

    Chunks are contiguous in token-id space and appended in stream order, so
    a token id is resolved with one searchsorted over the chunks' first ids.
    Host-side per-chunk counts (``row0_tokens``) let policies size their
    choices without reading device memory. Storage grows geometrically with
    the number of live chunks (bounded by the number of cached tokens of all
    layers and heads), never per frame once that number is steady.
    """

    def __init__(self, capacity: int = 256) -> None:
        self._data = torch.zeros((len(TABLE_COLUMNS), max(1, capacity)), dtype=torch.long)
        self._n = 0
        self._next_chunk_id = 0
        self._next_token_id = 0
        self._lookup: Optional[ChunkLookup] = None

    def __len__(self) -> int:
        return self._n

    @property
    def next_token_id(self) -> int:
        return self._next_token_id

    def column(self, name: str) -> torch.Tensor:
        """[R] int64 CPU view of one column (see :data:`TABLE_COLUMNS`) over the live chunks, oldest first."""
        return self._data[_COL[name], : self._n]

    def _cols(self) -> dict:
        return {name: self._data[i, : self._n] for i, name in enumerate(TABLE_COLUMNS)}

    @property
    def records(self) -> list[ChunkRecord]:
        """Snapshots of every row (O(R) Python objects: for inspection and tests, not hot paths)."""
        c = {k: v.tolist() for k, v in self._cols().items()}
        out = []
        for i in range(self._n):
            chunk = VisionChunk(int(c["grid_h"][i]), int(c["grid_w"][i]), camera=int(c["camera"][i]),
                                stamp_ns=int(c["stamp"][i]), end_stamp_ns=int(c["end_stamp"][i]),
                                num_frames=int(c["num_frames"][i]), position=int(c["position"][i]),
                                max_position=int(c["max_position"][i]))
            out.append(ChunkRecord(chunk, int(c["chunk_id"][i]), int(c["first"][i]), int(c["row0_tokens"][i])))
        return out

    def append(self, chunk: VisionChunk) -> ChunkRecord:
        """Add a chunk (newest); its tokens get the next ``num_tokens`` global ids."""
        if self._n == self._data.shape[1]:
            grown = torch.zeros((self._data.shape[0], 2 * self._data.shape[1]), dtype=torch.long)
            grown[:, : self._n] = self._data[:, : self._n]
            self._data = grown
        row = (self._next_token_id, chunk.grid_h, chunk.grid_w, chunk.camera, chunk.stamp_ns, chunk.end_stamp_ns,
               chunk.num_frames, self._next_chunk_id, chunk.position, chunk.max_position, chunk.num_tokens)
        self._data[:, self._n] = torch.tensor(row, dtype=torch.long)
        rec = ChunkRecord(chunk, self._next_chunk_id, self._next_token_id, chunk.num_tokens)
        self._n += 1
        self._next_chunk_id += 1
        self._next_token_id += chunk.num_tokens
        self._lookup = None
        return rec

    def prune(self, live_token_ids: torch.Tensor) -> int:
        """Drop chunks none of whose tokens is in ``live_token_ids``; returns how many.

        Args:
            live_token_ids: [L, B, H_kv, S] ids of every token still cached
                (row [0, 0, 0] also refreshes ``row0_tokens``).

        One host synchronisation (a [2, R] count tensor read back).
        """
        n = self._n
        if not n:
            return 0
        ci = self.chunk_index(live_token_ids)
        counts = torch.stack([
            torch.bincount(ci.reshape(-1), minlength=n), torch.bincount(ci[0, 0, 0], minlength=n),
        ]).cpu()
        self._data[_COL["row0_tokens"], :n] = counts[1]
        alive = counts[0] > 0
        kept = int(alive.sum())
        if kept < n:
            self._data[:, :kept] = self._data[:, :n][:, alive].clone()
            self._n = kept
            self._lookup = None
        return n - kept

    def shift_positions(self, delta: torch.Tensor, fixed_max_position: torch.Tensor) -> None:
        """Move every live chunk's first (temporal) position down by ``delta`` (a re-base).

        ``position`` becomes position - delta; ``max_position`` becomes
        max(max_position - delta, fixed_max_position): the largest id over the
        shifted axis and the axes that do not move.

        Args:
            delta: [R] integer shift per live chunk (oldest first), positions.
            fixed_max_position: [R] integer largest position id of each chunk on the
                axes that stay (M-RoPE: height / width).

        Raises:
            ValueError: tensors that are not [R].
        """
        n = self._n
        if tuple(delta.shape) != (n,) or tuple(fixed_max_position.shape) != (n,):
            raise ValueError(f"shift_positions needs [{n}] tensors, got {tuple(delta.shape)} / "
                             f"{tuple(fixed_max_position.shape)}")
        d = delta.to("cpu", torch.long)
        pos, top = self._data[_COL["position"], :n], self._data[_COL["max_position"], :n]
        pos -= d
        top.copy_(torch.maximum(top - d, fixed_max_position.to("cpu", torch.long)))
        # the device lookup holds no positions: it stays valid

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The table as CPU tensors: one [R] int64 tensor per column of :data:`TABLE_COLUMNS` (R = live chunks,
        oldest first) and the 0-dim int64 counters ``next_chunk_id`` / ``next_token_id``. Copies, contiguous."""
        state = {name: col.clone() for name, col in self._cols().items()}
        state["next_chunk_id"] = torch.tensor(self._next_chunk_id, dtype=torch.long)
        state["next_token_id"] = torch.tensor(self._next_token_id, dtype=torch.long)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the table by one exported with :meth:`state_dict`; validated first, unchanged on error.

        Raises:
            ValueError: a missing column or counter, a column that is not [R] integer, columns of
                different lengths, chunks not ascending in token-id space, or counters behind the rows.
        """
        missing = [k for k in (*TABLE_COLUMNS, "next_chunk_id", "next_token_id") if k not in state]
        if missing:
            raise ValueError(f"chunk table state lacks {missing}")
        cols = [state[name] for name in TABLE_COLUMNS]
        if any(c.dim() != 1 or c.dtype.is_floating_point or c.dtype == torch.bool for c in cols):
            raise ValueError("chunk table columns must be 1-D integer tensors")
        n = cols[0].shape[0]
        if any(c.shape[0] != n for c in cols):
            raise ValueError(f"chunk table columns of different lengths {[c.shape[0] for c in cols]}")
        data = torch.zeros((len(TABLE_COLUMNS), max(256, n)), dtype=torch.long)
        if n:
            data[:, :n] = torch.stack([c.to("cpu", torch.long) for c in cols])
        next_chunk, next_token = int(state["next_chunk_id"]), int(state["next_token_id"])
        first, chunk_id = data[_COL["first"], :n], data[_COL["chunk_id"], :n]
        if n and (bool((first[1:] <= first[:-1]).any()) or bool((chunk_id[1:] <= chunk_id[:-1]).any())):
            raise ValueError("chunk table rows are not in stream order (first token ids / chunk ids must ascend)")
        if n and (next_token <= int(first[-1]) or next_chunk <= int(chunk_id[-1])):
            raise ValueError(f"chunk table counters (next chunk {next_chunk}, next token {next_token}) "
                             f"are behind its rows")
        self._data = data
        self._n = n
        self._next_chunk_id = next_chunk
        self._next_token_id = next_token
        self._lookup = None

    def lookup(self, device: torch.device) -> ChunkLookup:
        """Device tensors describing the chunks (rebuilt only when the table changed)."""
        device = torch.device(device)
        if self._lookup is None or self._lookup.device != device:
            self._lookup = ChunkLookup(self._cols(), device)
        return self._lookup

    def chunk_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Row (0 = oldest live chunk) of the chunk holding each token id (same shape)."""
        first = self.lookup(token_ids.device).first
        return torch.searchsorted(first, token_ids.contiguous(), right=True) - 1

    # ----------------------------------------------------------------- queries
    def select(self, cameras: Optional[Sequence[int]] = None, since_ns: int = 0, until_ns: int = 0) -> torch.Tensor:
        """[R] bool CPU tensor: chunks of ``cameras`` (None = any) whose frames overlap [since_ns, until_ns] (0 = open)."""
        return _select(self.column("camera"), self.column("stamp"), self.column("end_stamp"), cameras, since_ns, until_ns)

    def frames(self, mask: Optional[torch.Tensor] = None) -> int:
        """Camera frames in the (selected) chunks."""
        col = self.column("num_frames")
        return int(col.sum() if mask is None else col[mask].sum())

    def stamp_range(self, mask: Optional[torch.Tensor] = None) -> tuple[int, int]:
        """(oldest first-frame stamp, newest last-frame stamp) of the (selected) chunks, ns; (0, 0) if none."""
        stamp, end = self.column("stamp"), self.column("end_stamp")
        if mask is not None:
            stamp, end = stamp[mask], end[mask]
        if not stamp.numel():
            return 0, 0
        return int(stamp.min()), int(end.max())

    def max_position(self) -> Optional[int]:
        """Largest position id of any cached chunk; None when empty."""
        return int(self.column("max_position").max()) if self._n else None

    def recent_chunks(self, recent_ratio: float) -> tuple[torch.Tensor, int]:
        """Which chunks are the most recent frames of their camera: ([R] bool CPU tensor, tokens per head).

        Per camera, r = max(1, round(recent_ratio * S_cam / p_cam)) newest chunks,
        with S_cam the camera's tokens held by layer 0 / head 0 and p_cam the size
        of its newest chunk: recent_ratio of the cached tokens counted in
        (pseudo-)frames (InfiniPot-V Sec. 4.2: r = 1/8 of the frames in the
        cache). The token count is the chunks' full size: recent chunks are
        kept whole by every layer and head. Notes are never recent. Host-side only (no device read).
        """
        if not self._n:
            return torch.zeros(0, dtype=torch.bool), 0
        lk = self._host_lookup()
        slot, t_local = lk.slot_cpu, lk.t_local_cpu
        frames = torch.tensor(lk.frames_per_slot, dtype=torch.long)
        tokens = self.column("grid_h") * self.column("grid_w")
        s_cam = torch.bincount(slot, weights=self.column("row0_tokens").double(), minlength=lk.n_slots)
        newest = torch.zeros(lk.n_slots, dtype=torch.long)
        last = t_local == frames[slot] - 1  # each camera's newest chunk
        newest[slot[last]] = tokens[last]
        # round half to even, as Python's round()
        r = torch.clamp(torch.round(recent_ratio * s_cam / newest.double()), min=1).long()
        flags = (t_local >= frames[slot] - r[slot]) & (self.column("camera") != NOTE_CAMERA)
        return flags, int(tokens[flags].sum())

    def _host_lookup(self) -> ChunkLookup:
        """The lookup already built for a device (its CPU index columns are what host code needs), else a CPU one."""
        return self._lookup if self._lookup is not None else self.lookup(torch.device("cpu"))

    def place_references(self, recent: torch.Tensor) -> torch.Tensor:
        """Global ids of the recent chunks' tokens at every place: [n_places, r] int64, -1 = none.

        Row q is the place ``place_offset + row * place_width + col`` of
        :class:`ChunkLookup`; column j the camera's j-th recent chunk (oldest
        first). An id is -1 where the camera has fewer recent chunks or the
        chunk's grid does not reach that (row, col). Host-side, O(places x r).

        Args:
            recent: [R] bool CPU tensor per chunk, from :meth:`recent_chunks`.
        """
        lk = self._host_lookup()
        first, gh, gw = self.column("first").tolist(), self.column("grid_h").tolist(), self.column("grid_w").tolist()
        per_slot = [torch.nonzero(recent & (lk.slot_cpu == k)).view(-1).tolist() for k in range(lk.n_slots)]
        r_max = max((len(x) for x in per_slot), default=0)
        out = torch.full((lk.n_places, max(1, r_max)), -1, dtype=torch.long)
        offset = 0
        for (h, w), recs in zip(lk.grid_per_slot, per_slot):
            q = torch.arange(h * w)
            row, col = q // w, q % w
            for j, rec in enumerate(recs):
                inside = (row < gh[rec]) & (col < gw[rec])
                out[offset + q[inside], j] = first[rec] + row[inside] * gw[rec] + col[inside]
            offset += h * w
        return out

    def layout(self, token_ids: torch.Tensor) -> "VisionLayout":
        """Per-token source information for a [N, H_kv, S] tensor of token ids (N = batch x layers).

        The ids of every row must be ascending (the cache keeps them so).
        """
        return VisionLayout(token_ids, self, self.lookup(token_ids.device))


class VisionLayout:
    """Source of every cached vision token, for a [N, H_kv, S] tensor of ascending token ids.

    Per-token fields are [N, H_kv, S] int64 tensors computed on first use
    (a scorer pays only for what it reads): ``chunk`` (row of the chunk
    table), ``chunk_id``, ``row``, ``col`` (spatial index on the
    chunk's merged grid), ``camera``, ``camera_slot``, ``t_local`` (order of
    the chunk among its camera's cached chunks: the time axis), ``stamp_ns``,
    ``end_stamp_ns``. ``lookup`` holds the per-chunk tensors, ``table`` the
    chunk table; ``frames_per_slot`` / ``grid_per_slot`` are host-side, so
    scorers size tensors without a device sync.
    """

    def __init__(self, token_ids: torch.Tensor, table: ChunkTable, lookup: ChunkLookup) -> None:
        self.token_ids = token_ids
        self.table = table
        self.lookup = lookup
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def frames_per_slot(self) -> list[int]:
        return list(self.lookup.frames_per_slot)

    @property
    def grid_per_slot(self) -> list[tuple[int, int]]:
        return list(self.lookup.grid_per_slot)

    def narrow(self, start: int, length: int) -> "VisionLayout":
        """The layout of rows [start, start + length) of the N axis (views, no copy)."""
        sub = VisionLayout(self.token_ids.narrow(0, start, length), self.table, self.lookup)
        sub._cache = {k: v.narrow(0, start, length) for k, v in self._cache.items()}
        return sub

    def _field(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = self._compute(name)
        return self._cache[name]

    def _compute(self, name: str) -> torch.Tensor:
        lk = self.lookup
        if name == "chunk":
            return torch.searchsorted(lk.first, self.token_ids.contiguous(), right=True) - 1
        if name == "local":
            return self.token_ids - lk.first[self.chunk]
        if name == "row":
            return torch.div(self._field("local"), lk.grid_w[self.chunk], rounding_mode="floor")
        if name == "col":
            return self._field("local") - self.row * lk.grid_w[self.chunk]
        column = {"chunk_id": "chunk_id", "camera": "camera", "camera_slot": "slot", "t_local": "t_local",
                  "stamp_ns": "stamp", "end_stamp_ns": "end_stamp"}[name]
        return getattr(lk, column)[self.chunk]

    chunk = property(lambda self: self._field("chunk"))
    chunk_id = property(lambda self: self._field("chunk_id"))
    row = property(lambda self: self._field("row"))
    col = property(lambda self: self._field("col"))
    camera = property(lambda self: self._field("camera"))
    camera_slot = property(lambda self: self._field("camera_slot"))
    t_local = property(lambda self: self._field("t_local"))
    stamp_ns = property(lambda self: self._field("stamp_ns"))
    end_stamp_ns = property(lambda self: self._field("end_stamp_ns"))

    def spatial_index(self) -> tuple[torch.Tensor, int]:
        """([N, H_kv, S] dense id of (camera, row, col), number of ids): equal ids = same place in the image."""
        lk = self.lookup
        place = lk.place_offset[self.chunk] + self.row * lk.place_width[self.chunk] + self.col
        return place, lk.n_places

    def recent_mask(self, recent_ratio: float) -> torch.Tensor:
        """[N, H_kv, S] bool: tokens of the most recent frames, per camera (see :meth:`recent_selection`)."""
        return self.recent_selection(recent_ratio)[0]

    def recent_selection(self, recent_ratio: float) -> tuple[torch.Tensor, int]:
        """Tokens of the most recent frames, per camera: ([N, H_kv, S] bool mask, tokens per head).

        See :meth:`ChunkTable.recent_chunks` for the rule; no host synchronisation.
        """
        flags, n_tokens = self.table.recent_chunks(recent_ratio)
        flag = flags.to(self.token_ids.device)
        return flag[self.chunk], n_tokens
