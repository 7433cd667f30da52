"""infinipot-stream: stream a video file through the engine without ROS, asking questions on the way.

Frames are read with the one video reader (:mod:`.video`), stamped index /
video fps, sampled at --fps by stamp (the engine's frame gate, like the node),
paired into temporal patches and prefilled onto the capped KV cache.

Questions (multi-turn, paper Sec. 5):

* ``--ask-at SECONDS:QUESTION`` (repeatable) is asked DURING the stream, at
  SECONDS of video time: once every frame stamped <= SECONDS was offered to
  the engine and before the first later one. The answer comes from the cache
  as it is at that moment; the question and answer tokens live in the cache's
  scratch region (never counted against the vision budget M) and are removed
  after answering, so the stream continues on exactly the cache it had. A
  sampled frame still waiting for the partner of its temporal patch
  (Qwen2.5-VL: 2 frames) is not in the cache yet, so ``newest_stamp`` of an
  answer can be up to one patch before SECONDS. SECONDS past the end of the
  video: asked after the last frame. Only the first ':' separates, so the
  question may contain colons.
* ``--ask QUESTION`` (repeatable) is asked after the last frame.

Text events: ``--note-at SECONDS:TEXT`` (repeatable) appends TEXT to the
stream at SECONDS of video time, stamped SECONDS (like the node's ``notes``
topic): once every frame stamped <= SECONDS was offered, before a question
asked at the same time. The note is a chunk of the stream, compressed under
the same cap, visible to the questions asked after it.

With --json the tool prints one JSON object per line:

* per sampled frame: {"frame", "stamp", "status", "kv_tokens", "vision_tokens",
  "kv_bytes", "rss_bytes", "ms", "compressed"} (+ "error")
* per answer, in the order asked: {"question", "answer", "at", "newest_stamp",
  "frames_in_context", "latency_s", "kv_tokens", "vision_tokens", "kv_bytes",
  "kv_bytes_during", "compressions", "generated_tokens"} (+ "error"); "at" is
  the video time it was asked at (s: SECONDS, or the last frame's stamp for
  --ask), "newest_stamp" the newest frame it could see (s), the kv_* and
  vision_tokens figures are the cache after the answer, "kv_bytes_during" the
  most KV bytes in use while answering (question + answer included).
* per note: {"note", "at", "status", "tokens", "kv_tokens", "vision_tokens"} (+ "error")
* one summary object: {"summary": {...}}; "kv_bytes_peak" is the most KV bytes
  in use at any point: after every ingest, while a patch was prefilled before
  the compression it triggered, and while answering.

Stamps and times are seconds of video time; bytes are K and V of all layers.
Exit codes: 0 ok, 2 bad arguments or unreadable video, 1 engine failure.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

from ..models.static_decode import DECODE_MODES
from .video import ReadStats, VideoReader

log = logging.getLogger("infinipot-stream")


def _default(name: str):
    """EngineConfig's default for ``name``: the one place defaults live."""
    from ..engine import EngineConfig

    return EngineConfig.__dataclass_fields__[name].default


# ------------------------------------------------------------------ questions
@dataclass(frozen=True)
class TimedQuestion:
    """A question asked at one point of a stream.

    Attributes:
        question: the text sent to the engine.
        at_s: video time (s) it is asked at: after every frame stamped <= at_s
            was offered, before the next one; None = after the last frame.
        tag: the caller's reference, returned with the answer (not sent anywhere).
    """

    question: str
    at_s: Optional[float] = None
    tag: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError("question is empty")
        if self.at_s is not None and not (math.isfinite(self.at_s) and self.at_s >= 0):
            raise ValueError(f"ask time must be a finite number of seconds >= 0, got {self.at_s}")


@dataclass(frozen=True)
class TimedNote:
    """A text event appended to the stream at ``at_s`` seconds of video time (stamped so)."""

    text: str
    at_s: float

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError("note is empty")
        if not (math.isfinite(self.at_s) and self.at_s >= 0):
            raise ValueError(f"note time must be a finite number of seconds >= 0, got {self.at_s}")


def _split_timed(text: str, option: str, what: str) -> tuple[float, str]:
    """``"SECONDS:REST"`` -> (seconds, rest stripped); only the first ':' separates."""
    head, sep, rest = text.partition(":")
    if not sep:
        raise ValueError(f"{option} wants SECONDS:{what.upper()}, got {text!r}")
    try:
        at_s = float(head.strip())
    except ValueError:
        raise ValueError(f"{option}: {head.strip()!r} is not a number of seconds (in {text!r})") from None
    if not (math.isfinite(at_s) and at_s >= 0):
        raise ValueError(f"{option}: seconds must be finite and >= 0 (in {text!r})")
    if not rest.strip():
        raise ValueError(f"{option}: empty {what} in {text!r}")
    return at_s, rest.strip()


def parse_note_at(text: str) -> TimedNote:
    """``"SECONDS:TEXT"`` -> :class:`TimedNote`; only the first ':' separates.

    Raises:
        ValueError: no ':', SECONDS not a number >= 0, or an empty text.
    """
    at_s, note = _split_timed(text, "--note-at", "text")
    return TimedNote(note, at_s)


def parse_ask_at(text: str) -> TimedQuestion:
    """``"SECONDS:QUESTION"`` -> :class:`TimedQuestion`; only the first ':' separates.

    Raises:
        ValueError: no ':', SECONDS not a number >= 0, or an empty question.
    """
    at_s, question = _split_timed(text, "--ask-at", "question")
    return TimedQuestion(question, at_s)


# -------------------------------------------------------------------- records
@dataclass
class FrameRecord:
    """What one sampled frame did to the cache (the per-frame JSON line)."""

    frame: int  # index in the video
    stamp: float  # video time (s)
    status: str  # IngestStatus value: buffered, ingested, rejected, dropped
    kv_tokens: int  # cached tokens per layer and KV head after the frame (prefix + vision)
    vision_tokens: int  # vision tokens per layer and KV head after the frame (<= M when capped)
    kv_bytes: int  # K and V bytes in use, all layers
    rss_bytes: int  # process resident set size
    ms: float  # wall time of the frame (encode + prefill + compression for the second of a pair)
    compressed: bool  # this frame's patch triggered a compression
    error: str = ""

    def to_json(self) -> dict:
        out = asdict(self)
        if not self.error:
            del out["error"]
        return out


@dataclass
class AnswerRecord:
    """One answered (or refused) question (the per-answer JSON line); cache figures are after the answer."""

    question: str
    answer: str
    at: float  # video time the question was asked at (s)
    newest_stamp: Optional[float]  # newest frame visible to the answer (s); None if refused
    frames_in_context: int
    latency_s: float
    kv_tokens: int
    vision_tokens: int
    kv_bytes: int
    kv_bytes_during: int  # most K and V bytes in use while answering (question + answer included)
    compressions: int  # compressions so far (an answer never triggers one)
    generated_tokens: int
    error: str = ""
    tag: Any = field(default=None, repr=False)  # TimedQuestion.tag; not in the JSON

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "tag"}
        if not self.error:
            del out["error"]
        return out


@dataclass
class NoteRecord:
    """One text event offered to the stream (the per-note JSON line); cache figures are after it."""

    note: str
    at: float  # video time it was appended at (s), also its stamp
    status: str  # IngestStatus value: ingested or rejected
    tokens: int  # tokens the note added (0 if rejected)
    kv_tokens: int
    vision_tokens: int  # vision + note tokens per layer and KV head
    error: str = ""

    def to_json(self) -> dict:
        out = asdict(self)
        if not self.error:
            del out["error"]
        return out


StreamEvent = Union[FrameRecord, AnswerRecord, NoteRecord]


class VideoSession:
    """One pass of a video file through an engine, with questions asked on the way.

    Args:
        engine: a :class:`~infinipot_ros.engine.StreamingAssistant` (its cache is
            used as it is; a fresh engine starts an empty stream).
        path: the video file.
        questions: asked in time order (equal times in the given order); those
            with ``at_s`` None after the last frame, after any that were timed
            past the end.
        max_frames: read at most this many video frames (0 = all).
        camera: camera name the frames are offered under.
        max_new_tokens: answer cap (0 = the engine's).
        context_s: > 0 limits what an answer sees to frames stamped within
            this many seconds before its ask time (0 = the whole cache).
        notes: text events appended at their times (before a question at the same time);
            those past the end after the last frame, before the questions left.
        stop_when_answered: stop reading once every question is answered
            (none is left for after the last frame); the eval harness streams
            a video only as far as its last question.

    :meth:`events` yields a :class:`FrameRecord` per sampled frame and an
    :class:`AnswerRecord` per question, in stream order. Totals are on the
    session afterwards: ``frames_read``, ``video_stats`` (:class:`~.video.ReadStats`:
    undecodable frames skipped, frames the header announced but never read),
    ``last_stamp_s``, ``kv_bytes_peak``
    (bytes in use, see the module doc), ``rss_bytes_peak``, ``ingest_ms`` (sum
    over sampled frames) and ``records``.
    """

    def __init__(self, engine, path: str, questions: Sequence[TimedQuestion] = (), *, max_frames: int = 0,
                 camera: str = "video", max_new_tokens: int = 0, context_s: float = 0.0,
                 stop_when_answered: bool = False, notes: Sequence[TimedNote] = ()) -> None:
        if context_s < 0:
            raise ValueError(f"context_s must be >= 0, got {context_s}")
        self.engine = engine
        self.path = path
        timed = [q for q in questions if q.at_s is not None]
        self._timed = sorted(timed, key=lambda q: q.at_s)  # stable: equal times keep their order
        self._at_end = [q for q in questions if q.at_s is None]
        self._notes = sorted(notes, key=lambda n: n.at_s)
        self.max_frames = max_frames
        self.camera = camera
        self.max_new_tokens = max_new_tokens
        self.context_s = context_s
        self.stop_when_answered = stop_when_answered and not self._at_end
        self.frames_read = 0
        self.last_stamp_s = 0.0
        self.kv_bytes_peak = 0
        self.rss_bytes_peak = 0
        self.ingest_ms = 0.0
        self.video_stats = ReadStats()
        self.records: list[StreamEvent] = []

    def events(self) -> Iterator[StreamEvent]:
        """Stream the video and answer the questions; yields records as they happen.

        Raises:
            OSError: the video cannot be opened.
        """
        from ..engine import IngestStatus

        st = self.engine.stats()
        self._bpt = st.cache.bytes_per_token
        self._tokens = st.cache.tokens
        self.kv_bytes_peak = max(self.kv_bytes_peak, st.cache.kv_bytes)
        pending = list(self._timed)
        notes = list(self._notes)
        reader = VideoReader(self.path, max_frames=self.max_frames)
        self.video_stats = reader.stats
        for index, stamp_ns, frame in reader:
            while (notes and stamp_ns > round(notes[0].at_s * 1e9)) or (pending and stamp_ns > round(pending[0].at_s * 1e9)):
                if notes and (not pending or notes[0].at_s <= pending[0].at_s):
                    yield self._emit(self._note(notes.pop(0)))
                else:
                    yield self._emit(self._ask(pending.pop(0)))
            if self.stop_when_answered and not pending:
                break
            self.frames_read += 1
            self.last_stamp_s = stamp_ns / 1e9
            result = self.engine.offer(self.camera, frame, stamp_ns)
            if result is None:  # not sampled by the gate
                continue
            self.ingest_ms += result.ms
            st = self.engine.stats()
            if result.status is IngestStatus.INGESTED:  # the chunk was all in the cache before its compression
                self.kv_bytes_peak = max(self.kv_bytes_peak, (self._tokens + result.chunk_tokens) * self._bpt)
            self._tokens = st.cache.tokens
            self.kv_bytes_peak = max(self.kv_bytes_peak, st.cache.kv_bytes)
            self.rss_bytes_peak = max(self.rss_bytes_peak, st.rss_bytes)
            yield self._emit(FrameRecord(
                frame=index, stamp=stamp_ns / 1e9, status=result.status.value, kv_tokens=st.cache.tokens,
                vision_tokens=st.cache.vision_tokens, kv_bytes=st.cache.kv_bytes, rss_bytes=st.rss_bytes,
                ms=round(result.ms, 3), compressed=result.compression is not None, error=result.error,
            ))
        for n in notes:
            yield self._emit(self._note(n))
        for q in pending + self._at_end:
            yield self._emit(self._ask(q))

    def _note(self, n: TimedNote) -> NoteRecord:
        result = self.engine.add_note(n.text, round(n.at_s * 1e9))
        st = self.engine.stats().cache
        self.kv_bytes_peak = max(self.kv_bytes_peak, st.kv_bytes, (self._tokens + result.chunk_tokens) * self._bpt)
        self._tokens = st.tokens
        return NoteRecord(note=n.text, at=n.at_s, status=result.status.value, tokens=result.chunk_tokens,
                          kv_tokens=st.tokens, vision_tokens=st.vision_tokens, error=result.error)

    def _emit(self, record: StreamEvent) -> StreamEvent:
        self.records.append(record)
        return record

    def _ask(self, q: TimedQuestion) -> AnswerRecord:
        from ..engine import AskError

        at_s = q.at_s if q.at_s is not None else self.last_stamp_s
        since_ns = max(0, round((at_s - self.context_s) * 1e9)) if self.context_s > 0 else 0
        cache = self.engine.cache
        during = [cache.stats().kv_bytes]

        def on_token(_piece: str, _n: int) -> None:
            during.append(cache.stats().kv_bytes)

        error, res = "", None
        try:
            res = self.engine.ask(q.question, since_ns=since_ns, max_new_tokens=self.max_new_tokens,
                                  on_token=on_token)
        except AskError as exc:
            error = str(exc)
        st = self.engine.stats().cache
        self.kv_bytes_peak = max(self.kv_bytes_peak, max(during))
        return AnswerRecord(
            question=q.question, answer=res.answer if res else "", at=round(at_s, 6),
            newest_stamp=res.newest_stamp_ns / 1e9 if res else None,
            frames_in_context=res.frames_in_context if res else 0,
            latency_s=round(res.latency_s, 4) if res else 0.0, kv_tokens=st.tokens, vision_tokens=st.vision_tokens,
            kv_bytes=st.kv_bytes, kv_bytes_during=max(during), compressions=st.compressions,
            generated_tokens=res.generated_tokens if res else 0, error=error, tag=q.tag,
        )


# ------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infinipot-stream",
        description="Stream a video into a multimodal LLM under a hard KV-cache cap (InfiniPot-V), asking on the way.",
    )
    p.add_argument("--video", required=True, help="video file (anything OpenCV reads)")
    p.add_argument("--model", default=None, help="builtin:tiny-qwen2.5-vl (default), a local dir or an HF id")
    p.add_argument("--device", default=_default("device"), help="auto, cpu, cuda, cuda:N (default %(default)s)")
    p.add_argument("--dtype", default=_default("dtype"), help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16 (default %(default)s)")
    p.add_argument("--fps", type=float, default=_default("frame_rate_hz"),
                   help="frames per second sampled by stamp (default %(default)s)")
    p.add_argument("--max-frames", type=int, default=0, help="read at most this many video frames (0 = all)")
    p.add_argument("--max-pixels", type=int, default=None, help=f"cap on pixels per frame (default {_default('max_pixels')})")
    p.add_argument("--max-tokens", type=int, default=None, help=f"M: max vision tokens per layer and head (default {_default('max_vision_tokens')})")
    p.add_argument("--budget-mb", type=float, default=None, help="cap on the resident KV cache in MB instead of --max-tokens")
    p.add_argument("--target-ratio", type=float, default=None, help=f"C/M after a compression (default {_default('target_ratio')})")
    p.add_argument("--policy", default=None,
                   help="infinipot_v (default), tar, van, van_pool, uniform, recent, or none")
    p.add_argument("--no-compress", action="store_true", help="full KV cache, no cap (same as --policy none)")
    p.add_argument("--ask", action="append", default=[], metavar="QUESTION", help="question asked after the last frame (repeatable)")
    p.add_argument("--ask-at", action="append", default=[], metavar="SECONDS:QUESTION",
                   help="question asked during the stream, once the frames stamped <= SECONDS (video time) "
                        "were ingested; its tokens are removed after answering (repeatable)")
    p.add_argument("--note-at", action="append", default=[], metavar="SECONDS:TEXT",
                   help="text event appended to the stream at SECONDS (video time), stamped so; kept in the "
                        "memory under the same cap as the frames (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"answer length cap (default {_default('max_new_tokens')})")
    p.add_argument("--decode-mode", default=None, choices=DECODE_MODES,
                   help="answer decoding: auto (static step; CUDA graph on CUDA), eager, compile, dynamic")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _config_from_args(args: argparse.Namespace):
    from ..engine import EngineConfig

    kw: dict = {"device": args.device, "dtype": args.dtype, "frame_rate_hz": args.fps}
    if args.model:
        kw["model"] = args.model
    if args.max_pixels is not None:
        kw["max_pixels"] = args.max_pixels
    if args.max_tokens is not None:
        kw["max_vision_tokens"] = args.max_tokens
    if args.budget_mb is not None:
        kw["budget_mb"] = args.budget_mb
    if args.target_ratio is not None:
        kw["target_ratio"] = args.target_ratio
    if args.max_new_tokens is not None:
        kw["max_new_tokens"] = args.max_new_tokens
    if args.decode_mode is not None:
        kw["decode_mode"] = args.decode_mode
    if args.no_compress:
        if args.policy not in (None, "none"):
            raise ValueError("--no-compress contradicts --policy " + args.policy)
        kw["policy"] = "none"
    elif args.policy:
        kw["policy"] = args.policy
    return EngineConfig(**kw)


def _questions_from_args(args: argparse.Namespace) -> list[TimedQuestion]:
    """--ask-at (timed) then --ask (after the last frame); raises ValueError on a malformed one."""
    out = [parse_ask_at(text) for text in args.ask_at]
    for question in args.ask:
        if not question.strip():
            raise ValueError("--ask: empty question")
        out.append(TimedQuestion(question.strip()))
    return out


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not os.path.isfile(args.video):
        print(f"infinipot-stream: no such video file: {args.video}", file=sys.stderr)
        return 2
    try:
        config = _config_from_args(args)
        questions = _questions_from_args(args)
        notes = [parse_note_at(text) for text in args.note_at]
    except ValueError as exc:
        print(f"infinipot-stream: {exc}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from ..engine import StreamingAssistant

    t_start = time.perf_counter()
    try:
        engine = StreamingAssistant(config)
    except (ValueError, OSError) as exc:
        print(f"infinipot-stream: cannot load model: {exc}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t_start
    session = VideoSession(engine, args.video, questions, max_frames=args.max_frames, notes=notes)
    bar = tqdm(total=None, unit="frame", disable=args.quiet or args.json or not sys.stderr.isatty())
    try:
        for rec in session.events():
            if args.json:
                _emit(rec.to_json())
            elif isinstance(rec, FrameRecord):
                bar.update(1)
                bar.set_postfix(kv_MB=f"{rec.kv_bytes / 1e6:.1f}", comp=engine.cache.compressions)
    except OSError as exc:
        print(f"infinipot-stream: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()

    records = [r for r in session.records if isinstance(r, FrameRecord)]
    answers = [r for r in session.records if isinstance(r, AnswerRecord)]
    st = engine.stats()
    ingested = [r for r in records if r.status == "ingested"]
    summary = {
        "model": st.model_id,
        "device": st.device,
        "policy": st.policy,
        "video": args.video,
        "frames_read": session.frames_read,
        "frames_skipped": session.video_stats.skipped,
        "frames_missing": session.video_stats.missing,
        "frames_sampled": st.frames.sampled,
        "frames_ingested": st.frames.ingested,
        "frames_rejected": st.frames.rejected,
        "patches": len(ingested),
        "questions": len(answers),
        "notes_ingested": st.notes.ingested,
        "notes_rejected": st.notes.rejected,
        "notes_in_cache": st.notes.in_cache,
        "bytes_per_token": st.cache.bytes_per_token,
        "prefix_tokens": st.cache.prefix_tokens,
        "max_vision_tokens": st.cache.max_vision_tokens,
        "target_vision_tokens": st.cache.target_vision_tokens,
        "kv_bytes_budget": st.cache.kv_bytes_budget,
        "kv_bytes_final": st.cache.kv_bytes,
        "kv_bytes_peak": session.kv_bytes_peak,
        "kv_bytes_reserved": st.cache.kv_bytes_reserved,
        "compressions": st.cache.compressions,
        "tokens_evicted": st.cache.tokens_evicted,
        "last_compression_ms": round(st.cache.last_compression_ms, 3),
        "ms_per_patch_mean": round(sum(r.ms for r in ingested) / max(1, len(ingested)), 3),
        "rss_bytes_final": st.rss_bytes,
        "rss_bytes_peak": session.rss_bytes_peak,
        "load_s": round(load_s, 3),
        "wall_s": round(time.perf_counter() - t_start, 3),
    }
    if args.json:
        _emit({"summary": summary})
    else:
        _print_table(records, answers, summary, [r for r in session.records if isinstance(r, NoteRecord)])
    return 0


def _print_table(records: Sequence[FrameRecord], answers: Sequence[AnswerRecord], summary: dict,
                 notes: Sequence[NoteRecord] = ()) -> None:
    n = len(records)
    print(f"{'at':>5} {'frame':>6} {'kv_tokens':>10} {'kv_MB':>8} {'rss_MB':>8} {'ms':>8}")
    for frac in (0.25, 0.5, 1.0):
        if not n:
            break
        r = records[max(0, int(round(frac * n)) - 1)]
        print(f"{int(frac * 100):>4}% {r.frame:>6} {r.kv_tokens:>10} {r.kv_bytes / 1e6:>8.2f} "
              f"{r.rss_bytes / 1e6:>8.1f} {r.ms:>8.1f}")
    for r in notes:
        print(f"note @ {r.at:.2f} s: {r.note}  ({r.status}{', ' + r.error if r.error else f', {r.tokens} tokens'})")
    for a in answers:
        seen = f", frames to {a.newest_stamp:.2f} s" if a.newest_stamp is not None else ""
        print(f"Q @ {a.at:.2f} s: {a.question}\nA: {a.answer or a.error}  ({a.latency_s:.2f} s{seen})")
    for k, v in summary.items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    sys.exit(main())
