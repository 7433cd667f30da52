"""infinipot-eval: accuracy on streaming-video benchmarks (OVO-Bench, StreamingBench), per compression policy.

Reads a benchmark's OWN annotation file (--format, --items) and the videos
under --video-root, streams every video once per policy (--policies) through
the engine and asks each question at its time in that stream (multi-turn,
like ``infinipot-stream --ask-at``): the answer comes from the capped cache as
it is when the frames up to the question's time were ingested, and the
question and answer tokens are removed again, so later questions of the same
video see exactly the cache a fresh stream to their time would have. A
video is read only as far as its last question.

Formats:

* ``ovo`` (OVO-Bench, e.g. ``ovo_bench_new.json``): a list of items (or a dict
  of such lists) with ``id``, ``task``, ``video``. Backward (EPM, ASI, HLD) and
  real-time (STU, OJR, ATR, ACR, OCR, FPD) items carry ``realtime`` (s),
  ``question``, ``options`` and ``gt`` (index of the right option; ``answer``,
  the option's text, is used when ``gt`` is missing): one probe at
  ``realtime``. Forward items carry probes in ``test_info``, each
  ``{"realtime", ...}``: CRR (``question``; probe ``type`` 1 = the video so far
  answers it), SSR (probe ``step`` and ``type`` 1 = being performed now), REC
  (``activity``; probe ``count``).
* ``streamingbench`` (StreamingBench, e.g. its real-time questions file): a
  list of ``{"video_path", "questions": [{"task_type", "question",
  "time_stamp": "HH:MM:SS", "options": ["A. ...", ...], "answer": "A"}]}``;
  ``options`` may also be the string form of that list (as in the dataset's CSV).

Prompts and answers (also in docs/eval.md):

* multiple choice: the question, one line per option ``"A. text"`` (the
  file's own letters are stripped and the options re-lettered A, B, ... in
  their order), then ``"Answer with the option's letter."``. The answer is the
  FIRST standalone capital letter A-E of the reply (not next to another letter
  or digit: "B", "B.", "(B)", "B) a man" count; "Because" does not); none =
  unanswered, which counts as wrong, as does a letter with no option.
* OVO forward probes: CRR and SSR are posed as multiple choice with the options
  "A. Yes" / "B. No" (right: Yes for type 1); REC asks for a count with
  ``"Answer with a single number."`` and takes the first standalone integer
  (digits, not part of a word or a decimal); none = unanswered.

Reported per policy: accuracy (%) per task; OVO-Bench: the mean of the task
accuracies per category (backward, realtime, forward) and over all tasks
("overall", as OVO-Bench's scorer computes its total); StreamingBench:
correct / all questions ("overall"); unanswered counts; peak KV bytes in use
(after any ingest, during a chunk's prefill before its compression, while
answering; the largest over the videos) and the budget; ms per frame (ingest
wall time / frames ingested). ``--json`` prints (``--json FILE`` writes) all
of it plus one row per probe (answer text, parsed letter or number, truth).

Data parallel: under ``torchrun`` or ``accelerate launch`` (they set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) every process takes its share
of the videos (a video's questions share one stream, so they stay together;
longest stream first onto the least loaded rank), runs on cuda:LOCAL_RANK
(nccl) or the CPU (gloo), and rank 0 gathers the probes with
torch.distributed, reports and writes; the other ranks print nothing. The
result equals a single process's, timing aside.

Exit codes: 0 ok, 2 bad arguments, unreadable items file or missing videos,
1 the model failed to load or a rank failed.
"""
from __future__ import annotations

import argparse
import ast
import enum
import json
import logging
import math
import os
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional, Sequence

log = logging.getLogger("infinipot-eval")
PROG = "infinipot-eval"

#: Instruction closing every multiple-choice prompt.
MC_INSTRUCTION = "Answer with the option's letter."
#: Instruction closing an OVO-Bench REC (counting) prompt.
COUNT_INSTRUCTION = "Answer with a single number."
#: Option letters a multiple-choice item may use.
LETTERS = "ABCDE"
YES_NO = ("Yes", "No")

#: OVO-Bench tasks by category (its paper's three modes).
OVO_CATEGORIES = {
    "backward": ("EPM", "ASI", "HLD"),
    "realtime": ("STU", "OJR", "ATR", "ACR", "OCR", "FPD"),
    "forward": ("REC", "SSR", "CRR"),
}
_OVO_CATEGORY_OF = {task: cat for cat, tasks in OVO_CATEGORIES.items() for task in tasks}

_LETTER_RE = re.compile(r"(?<![A-Za-z0-9])[A-E](?![A-Za-z0-9])")
_NUMBER_RE = re.compile(r"(?<![A-Za-z0-9.])\d+(?![A-Za-z0-9]|\.\d)")
_OPTION_PREFIX_RE = re.compile(r"^\s*\(?([A-Ea-e])\s*[.):]\s*")


class BenchFormat(str, enum.Enum):
    """Annotation formats --format reads."""

    OVO = "ovo"  # OVO-Bench (ovo_bench_new.json)
    STREAMINGBENCH = "streamingbench"  # StreamingBench questions JSON


class AnswerKind(str, enum.Enum):
    """How a reply is parsed."""

    LETTER = "letter"  # first standalone A-E
    NUMBER = "number"  # first standalone integer


class EvalError(Exception):
    """A bad items file, a missing video or a bad argument (exit code 2)."""


# ------------------------------------------------------------------ parsing
def parse_letter(text: str) -> Optional[str]:
    """The first standalone capital letter A-E of ``text`` (not next to a letter or digit); None if there is none."""
    m = _LETTER_RE.search(text or "")
    return m.group(0) if m else None


def parse_number(text: str) -> Optional[str]:
    """The first standalone non-negative integer of ``text``, normalised ("03" -> "3"); None if there is none."""
    m = _NUMBER_RE.search(text or "")
    return str(int(m.group(0))) if m else None


def parse_answer(text: str, kind: AnswerKind) -> Optional[str]:
    return parse_letter(text) if kind is AnswerKind.LETTER else parse_number(text)


def multiple_choice_prompt(question: str, options: Sequence[str]) -> str:
    """The question, one ``"L. option"`` line per option (A, B, ...), then :data:`MC_INSTRUCTION`.

    Raises:
        EvalError: fewer than 2 or more than 5 options, or an empty one.
    """
    if not 2 <= len(options) <= len(LETTERS):
        raise EvalError(f"a multiple-choice question needs 2..{len(LETTERS)} options, got {len(options)}")
    if any(not str(o).strip() for o in options):
        raise EvalError("empty option")
    lines = [question.strip()] + [f"{LETTERS[i]}. {str(o).strip()}" for i, o in enumerate(options)]
    return "\n".join(lines + [MC_INSTRUCTION])


def strip_option_letters(options: Sequence[str]) -> list[str]:
    """Drop the options' own letters when they run A, B, C, ... in order (``"A. x"``, ``"A.x"``, ``"(A) x"``,
    ``"a) x"``, ``"A: x"``); options that are not lettered that way are returned as they are."""
    texts = [str(o) for o in options]
    matches = [_OPTION_PREFIX_RE.match(t) for t in texts]
    if not texts or not all(m and m.group(1).upper() == LETTERS[i] for i, m in enumerate(matches[: len(LETTERS)])) \
            or len(texts) > len(LETTERS):
        return [t.strip() for t in texts]
    return [t[m.end():].strip() for t, m in zip(texts, matches)]


def parse_timestamp(text: Any) -> float:
    """``"HH:MM:SS"`` (also ``"MM:SS"``, ``"SS"``, fractional seconds, or a number) -> seconds.

    Raises:
        EvalError: anything else, or a negative time.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        parts = str(text).strip().split(":")
        try:
            if not 1 <= len(parts) <= 3 or any(not p.strip() for p in parts):
                raise ValueError
            seconds = 0.0
            for p in parts:
                seconds = seconds * 60 + float(p)
        except ValueError:
            raise EvalError(f"bad time stamp {text!r} (HH:MM:SS)") from None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise EvalError(f"bad time stamp {text!r}")
    return seconds


# ------------------------------------------------------------------- probes
@dataclass(frozen=True)
class Probe:
    """One question asked at one point of one video.

    Attributes:
        key: unique in the run: the item id, plus ``@k`` for the k-th probe of an OVO forward item.
        item: the item's id in the annotation file (StreamingBench: its question_id, or "VIDEO#Q").
        task: OVO-Bench task (EPM ... CRR) or StreamingBench task_type.
        category: OVO-Bench category (backward, realtime, forward); "" for StreamingBench.
        video: the item's video path as the file gives it.
        path: that video under --video-root.
        at_s: video time (s) the question is asked at.
        prompt: the text sent to the model.
        kind: how the reply is parsed.
        truth: the right letter, or the count as digits.
        order: position in the file (reports keep it).
    """

    key: str
    item: str
    task: str
    category: str
    video: str
    path: str
    at_s: float
    prompt: str
    kind: AnswerKind
    truth: str
    order: int


def _video_path(video_root: str, video: str) -> str:
    return os.path.normpath(video if os.path.isabs(video) else os.path.join(video_root, video))


def _require(item: dict, keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in item or item[k] is None]
    if missing:
        raise EvalError(f"{where}: missing {', '.join(missing)}")


def _ovo_items(doc: Any) -> list[dict]:
    if isinstance(doc, dict):  # e.g. {"backward": [...], "realtime": [...], "forward": [...]}
        if not doc or not all(isinstance(v, list) for v in doc.values()):
            raise EvalError("an OVO-Bench file is a JSON list of items, or an object of such lists")
        doc = [it for v in doc.values() for it in v]
    if not isinstance(doc, list) or not all(isinstance(it, dict) for it in doc):
        raise EvalError("an OVO-Bench file is a JSON list of items (objects)")
    return doc


def load_ovo(doc: Any, video_root: str) -> list[Probe]:
    """Probes of an OVO-Bench annotation document (see the module doc), in file order.

    Raises:
        EvalError: an item without what its task needs, or an unknown task without options.
    """
    probes: list[Probe] = []
    for n, it in enumerate(_ovo_items(doc)):
        where = f"OVO item #{n} (id {it.get('id')!r})"
        _require(it, ("id", "task", "video"), where)
        task, item_id = str(it["task"]), str(it["id"])
        base = dict(item=item_id, task=task, category=_OVO_CATEGORY_OF.get(task, "other"), video=str(it["video"]),
                    path=_video_path(video_root, str(it["video"])))
        if task in OVO_CATEGORIES["forward"]:
            _require(it, ("test_info",), where)
            if not isinstance(it["test_info"], list) or not it["test_info"]:
                raise EvalError(f"{where}: test_info must be a non-empty list")
            for k, ti in enumerate(it["test_info"]):
                at_s = parse_timestamp(ti.get("realtime")) if isinstance(ti, dict) and "realtime" in ti else None
                if at_s is None:
                    raise EvalError(f"{where}: test_info[{k}] has no realtime")
                prompt, kind, truth = _ovo_forward_prompt(task, it, ti, f"{where} test_info[{k}]")
                probes.append(Probe(key=f"{item_id}@{k}", at_s=at_s, prompt=prompt, kind=kind, truth=truth,
                                    order=len(probes), **base))
            continue
        _require(it, ("realtime", "question", "options"), where)
        options = it["options"]
        if not isinstance(options, list):
            raise EvalError(f"{where}: options must be a list")
        gt = it.get("gt")
        if gt is None:
            if it.get("answer") not in options:
                raise EvalError(f"{where}: no gt, and answer is not one of the options")
            gt = options.index(it["answer"])
        if not isinstance(gt, int) or isinstance(gt, bool) or not 0 <= gt < len(options):
            raise EvalError(f"{where}: gt {gt!r} is not an option index")
        try:
            prompt = multiple_choice_prompt(str(it["question"]), [str(o) for o in options])
        except EvalError as exc:
            raise EvalError(f"{where}: {exc}") from None
        probes.append(Probe(key=item_id, at_s=parse_timestamp(it["realtime"]), prompt=prompt, kind=AnswerKind.LETTER,
                            truth=LETTERS[gt], order=len(probes), **base))
    _check_unique(probes)
    return probes


def _ovo_forward_prompt(task: str, item: dict, probe: dict, where: str) -> tuple[str, AnswerKind, str]:
    """(prompt, kind, truth) of one OVO-Bench forward probe (CRR, SSR: Yes/No as A/B; REC: a count)."""
    if task == "REC":
        _require(item, ("activity",), where)
        _require(probe, ("count",), where)
        prompt = (f"How many times have the people in the video done this so far, counting every complete "
                  f"motion: {str(item['activity']).strip()}?\n{COUNT_INSTRUCTION}")
        return prompt, AnswerKind.NUMBER, str(int(probe["count"]))
    _require(probe, ("type",), where)
    if probe["type"] not in (0, 1):
        raise EvalError(f"{where}: type must be 0 or 1, got {probe['type']!r}")
    if task == "CRR":
        _require(item, ("question",), where)
        question = (f"{str(item['question']).strip()}\n"
                    f"Does the video so far show enough to answer this question?")
    else:  # SSR
        _require(probe, ("step",), where)
        question = f"Is the person in the video performing this step right now: {str(probe['step']).strip()}?"
    return multiple_choice_prompt(question, YES_NO), AnswerKind.LETTER, "A" if probe["type"] == 1 else "B"


def load_streamingbench(doc: Any, video_root: str) -> list[Probe]:
    """Probes of a StreamingBench questions document (see the module doc), in file order.

    Raises:
        EvalError: an entry without video_path/questions, or a question without
            its fields, a bad time stamp, or an answer letter with no option.
    """
    if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
        raise EvalError("a StreamingBench file is a JSON list of {video_path, questions} objects")
    probes: list[Probe] = []
    for n, entry in enumerate(doc):
        where = f"StreamingBench entry #{n}"
        _require(entry, ("video_path", "questions"), where)
        video = str(entry["video_path"])
        for k, q in enumerate(entry["questions"]):
            qwhere = f"{where} question #{k}"
            _require(q, ("question", "time_stamp", "options", "answer"), qwhere)
            options = q["options"]
            if isinstance(options, str):  # the dataset's CSV keeps the list as its Python repr
                try:
                    options = ast.literal_eval(options)
                except (ValueError, SyntaxError):
                    raise EvalError(f"{qwhere}: options {q['options'][:60]!r} is not a list") from None
            if not isinstance(options, (list, tuple)):
                raise EvalError(f"{qwhere}: options must be a list")
            try:
                prompt = multiple_choice_prompt(str(q["question"]), strip_option_letters(options))
            except EvalError as exc:
                raise EvalError(f"{qwhere}: {exc}") from None
            truth = str(q["answer"]).strip().upper()
            if len(truth) != 1 or truth not in LETTERS[: len(options)]:
                raise EvalError(f"{qwhere}: answer {q['answer']!r} is not the letter of an option")
            item_id = str(q.get("question_id") or f"{n}#{k}")
            probes.append(Probe(
                key=item_id, item=item_id, task=str(q.get("task_type") or "unknown"), category="", video=video,
                path=_video_path(video_root, video), at_s=parse_timestamp(q["time_stamp"]), prompt=prompt,
                kind=AnswerKind.LETTER, truth=truth, order=len(probes),
            ))
    _check_unique(probes)
    return probes


def _check_unique(probes: Sequence[Probe]) -> None:
    seen: set[str] = set()
    for p in probes:
        if p.key in seen:
            raise EvalError(f"two questions share the id {p.key!r}")
        seen.add(p.key)


def load_probes(fmt: BenchFormat, items_path: str, video_root: str) -> list[Probe]:
    """Read ``items_path`` in format ``fmt``.

    Raises:
        EvalError: unreadable or malformed file, or no questions in it.
    """
    try:
        with open(items_path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise EvalError(f"cannot read {items_path}: {exc}") from None
    probes = load_ovo(doc, video_root) if fmt is BenchFormat.OVO else load_streamingbench(doc, video_root)
    if not probes:
        raise EvalError(f"{items_path} holds no questions")
    return probes


# ------------------------------------------------------------------ streams
@dataclass
class VideoStream:
    """The probes of one video: one stream per policy serves them all."""

    path: str
    probes: list[Probe]

    @property
    def cost_s(self) -> float:
        """Seconds of video the stream reads (up to its last question)."""
        return max(p.at_s for p in self.probes)


def group_streams(probes: Sequence[Probe]) -> list[VideoStream]:
    """One :class:`VideoStream` per video, in order of first appearance; probes in time order."""
    by_path: dict[str, list[Probe]] = {}
    for p in probes:
        by_path.setdefault(p.path, []).append(p)
    return [VideoStream(path, sorted(ps, key=lambda p: (p.at_s, p.order))) for path, ps in by_path.items()]


def split_streams(streams: Sequence[VideoStream], world_size: int) -> list[list[VideoStream]]:
    """Share the streams among ``world_size`` ranks: longest first onto the least loaded (ties: lower rank).

    Deterministic (every rank computes the same split from the same file);
    every stream goes to exactly one rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    shares: list[list[VideoStream]] = [[] for _ in range(world_size)]
    load = [0.0] * world_size
    for s in sorted(streams, key=lambda s: -s.cost_s):  # stable: equal lengths keep file order
        r = min(range(world_size), key=lambda i: (load[i], i))
        shares[r].append(s)
        load[r] += s.cost_s
    return shares


# -------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun / accelerate launch (from RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # "gloo", "nccl"; "" = a single process, no process group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Optional[dict] = None) -> "DistContext":
        """Read the launcher's variables (absent: a single process).

        Raises:
            EvalError: values that are not integers, or a rank outside the world.
        """
        env = os.environ if env is None else env
        try:
            rank, world, local = (int(env.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
        except ValueError:
            raise EvalError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
        if world < 1 or not 0 <= rank < world or local < 0:
            raise EvalError(f"bad launcher environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
        return cls(rank, world, local)


def _uses_cuda(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return False


def init_distributed(ctx: DistContext, device: str) -> tuple[DistContext, str]:
    """Join the launcher's process group; returns the context with its backend and this rank's device.

    CUDA (``device`` cuda, cuda:N, or auto with a GPU): device cuda:LOCAL_RANK
    and nccl; otherwise the CPU and gloo. A single process keeps ``device``.
    """
    if not ctx.distributed:
        return ctx, device
    import torch
    import torch.distributed as dist

    cuda = _uses_cuda(device)
    if cuda:
        torch.cuda.set_device(ctx.local_rank)
        device = f"cuda:{ctx.local_rank}"
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend)  # env:// rendezvous: MASTER_ADDR/MASTER_PORT from the launcher
    return DistContext(ctx.rank, ctx.world_size, ctx.local_rank, backend), device


def gather_to_rank0(ctx: DistContext, payload: Any) -> Optional[list]:
    """Every rank's ``payload`` in rank order on rank 0 (None on the others); [payload] for a single process."""
    if not ctx.distributed:
        return [payload]
    import torch.distributed as dist

    out = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object(payload, out, dst=0)
    return out


def _barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------- run
@dataclass
class PolicyTotals:
    """What one rank measured for one policy (summed / maxed over its videos)."""

    videos: int = 0
    frames_read: int = 0
    frames_ingested: int = 0
    ingest_ms: float = 0.0
    kv_bytes_peak: int = 0
    kv_bytes_budget: int = 0
    compressions: int = 0

    def merge(self, other: "PolicyTotals") -> None:
        self.videos += other.videos
        self.frames_read += other.frames_read
        self.frames_ingested += other.frames_ingested
        self.ingest_ms += other.ingest_ms
        self.kv_bytes_peak = max(self.kv_bytes_peak, other.kv_bytes_peak)
        self.kv_bytes_budget = max(self.kv_bytes_budget, other.kv_bytes_budget)
        self.compressions += other.compressions


def _probe_row(policy: str, p: Probe, rec, rank: int) -> dict:
    parsed = parse_answer(rec.answer, p.kind) if not rec.error else None
    return {
        "policy": policy, "key": p.key, "item": p.item, "task": p.task, "category": p.category, "video": p.video,
        "at_s": p.at_s, "kind": p.kind.value, "truth": p.truth, "answer": rec.answer, "parsed": parsed,
        "correct": parsed is not None and parsed == p.truth, "newest_stamp_s": rec.newest_stamp,
        "frames_in_context": rec.frames_in_context, "error": rec.error, "latency_s": rec.latency_s,
        "rank": rank, "order": p.order,
    }


def run_share(configs: dict, adapter, streams: Sequence[VideoStream], rank: int, *, max_new_tokens: int,
              context_s: float) -> dict:
    """Stream this rank's videos once per policy and answer their probes.

    Args:
        configs: policy name -> EngineConfig (same model settings, one policy each).
        adapter: the loaded model, shared by every engine.

    Returns:
        {"probes": [row per probe], "totals": {policy: PolicyTotals as a dict}}.
    """
    from ..engine import StreamingAssistant
    from .stream import AnswerRecord, TimedQuestion, VideoSession

    rows: list[dict] = []
    totals: dict[str, dict] = {}
    if streams:  # one-time costs (allocator, first kernels) stay out of the first policy's ms per frame
        _warm_up(next(iter(configs.values())), adapter, streams[0].path)
    for policy, config in configs.items():
        tot = PolicyTotals()
        for s in streams:
            engine = StreamingAssistant(config, adapter=adapter)
            questions = [TimedQuestion(p.prompt, p.at_s, tag=p) for p in s.probes]
            session = VideoSession(engine, s.path, questions, max_new_tokens=max_new_tokens, context_s=context_s,
                                   stop_when_answered=True)
            for rec in session.events():
                if isinstance(rec, AnswerRecord):
                    rows.append(_probe_row(policy, rec.tag, rec, rank))
            st = engine.stats()
            tot.merge(PolicyTotals(
                videos=1, frames_read=session.frames_read, frames_ingested=st.frames.ingested,
                ingest_ms=session.ingest_ms, kv_bytes_peak=session.kv_bytes_peak,
                kv_bytes_budget=st.cache.kv_bytes_budget, compressions=st.cache.compressions,
            ))
        totals[policy] = asdict(tot)
    return {"probes": rows, "totals": totals}


def _warm_up(config, adapter, path: str) -> None:
    """Ingest one temporal patch of ``path`` and answer one question on a throwaway engine (nothing recorded)."""
    from ..engine import StreamingAssistant
    from .stream import TimedQuestion, VideoSession
    from .video import probe_video

    step = max(1, math.ceil(probe_video(path).fps / config.frame_rate_hz)) if config.frame_rate_hz > 0 else 1
    engine = StreamingAssistant(config, adapter=adapter)
    session = VideoSession(engine, path, [TimedQuestion("What do you see?")], max_frames=step * 2 + 1)
    for _ in session.events():
        pass


# ------------------------------------------------------------------ scoring
def _pct(correct: int, n: int) -> Optional[float]:
    return round(100.0 * correct / n, 4) if n else None


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def score(fmt: BenchFormat, rows: Sequence[dict], policies: Sequence[str]) -> dict:
    """Accuracy per policy from the probe rows.

    Returns:
        {policy: {"tasks": {task: {"n", "correct", "unanswered", "accuracy"}}, "categories":
        {category: mean task accuracy} (OVO-Bench only), "overall", "n", "correct", "unanswered"}};
        accuracies in percent, None where there is nothing to score. "overall": OVO-Bench: the
        mean of the task accuracies; StreamingBench: correct / all questions.
    """
    out = {}
    for policy in policies:
        mine = [r for r in rows if r["policy"] == policy]
        tasks: dict[str, dict] = {}
        for r in mine:
            t = tasks.setdefault(r["task"], {"n": 0, "correct": 0, "unanswered": 0})
            t["n"] += 1
            t["correct"] += int(bool(r["correct"]))
            t["unanswered"] += int(r["parsed"] is None)
        for t in tasks.values():
            t["accuracy"] = _pct(t["correct"], t["n"])
        n, correct = len(mine), sum(int(bool(r["correct"])) for r in mine)
        res = {"tasks": tasks, "n": n, "correct": correct, "unanswered": sum(int(r["parsed"] is None) for r in mine)}
        if fmt is BenchFormat.OVO:
            cats = {}
            for cat, names in list(OVO_CATEGORIES.items()) + [("other", ())]:
                accs = [t["accuracy"] for name, t in tasks.items() if _OVO_CATEGORY_OF.get(name, "other") == cat]
                if accs:
                    cats[cat] = _mean(accs)
            res["categories"] = cats
            res["overall"] = _mean(t["accuracy"] for t in tasks.values())
        else:
            res["overall"] = _pct(correct, n)
        out[policy] = res
    return out


def task_order(fmt: BenchFormat, rows: Sequence[dict]) -> list[str]:
    """Tasks in report order: OVO-Bench by category then its own order; others as first seen."""
    seen = list(dict.fromkeys(r["task"] for r in sorted(rows, key=lambda r: r["order"])))
    if fmt is not BenchFormat.OVO:
        return seen
    known = [t for tasks in OVO_CATEGORIES.values() for t in tasks if t in seen]
    return known + [t for t in seen if t not in known]


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from ..engine import EngineConfig

    d = EngineConfig()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=[f.value for f in BenchFormat], help="annotation format")
    p.add_argument("--items", required=True, metavar="FILE", help="the benchmark's annotation JSON")
    p.add_argument("--video-root", required=True, metavar="DIR", help="folder the items' video paths are relative to")
    p.add_argument("--model", default=d.model, help="builtin:tiny-qwen2.5-vl (default), a local dir or an HF id")
    p.add_argument("--policies", default=d.policy,
                   help="comma-separated: infinipot_v, tar, van, van_pool, uniform, recent, none (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=d.max_vision_tokens,
                   help="M: vision tokens per layer and KV head at the cap (default %(default)s)")
    p.add_argument("--fps", type=float, default=d.frame_rate_hz,
                   help="frames per second sampled by stamp (default %(default)s)")
    p.add_argument("--device", default=d.device,
                   help="auto, cpu, cuda, cuda:N (default %(default)s; under a launcher: cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default=d.dtype, help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="cap on pixels per frame (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length cap (default %(default)s)")
    p.add_argument("--max-question-tokens", type=int, default=1024,
                   help="longest prompt accepted, in tokens (default %(default)s)")
    p.add_argument("--context-s", type=float, default=0.0,
                   help="> 0: an answer sees only frames stamped within this many seconds before its question")
    p.add_argument("--limit", type=int, default=0, help="only the first N questions of the file (0 = all)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="print the result as JSON instead of tables; with FILE: write it there (tables still printed)")
    return p


def _configs(args: argparse.Namespace, policies: Sequence[str], device: str) -> dict:
    from ..engine import EngineConfig

    out = {}
    for policy in policies:
        try:
            out[policy] = EngineConfig(
                model=args.model, device=device, dtype=args.dtype, max_pixels=args.max_pixels,
                frame_rate_hz=args.fps, policy=policy, max_vision_tokens=args.max_tokens,
                max_new_tokens=args.max_new_tokens, max_question_tokens=args.max_question_tokens,
            )
        except ValueError as exc:
            raise EvalError(f"policy {policy}: {exc}") from None
    return out


def _parse_policies(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise EvalError("--policies is empty")
    if len(set(names)) != len(names):
        raise EvalError(f"--policies names one policy twice: {text}")
    return names


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on bad arguments, 0 for --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        ctx = DistContext.from_env()
        fmt = BenchFormat(args.format)
        policies = _parse_policies(args.policies)
        if args.context_s < 0 or args.limit < 0:
            raise EvalError("--context-s and --limit must be >= 0")
        probes = load_probes(fmt, args.items, args.video_root)
        if args.limit:
            probes = probes[: args.limit]
        missing = sorted({p.path for p in probes if not os.path.isfile(p.path)})
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise EvalError(f"{len(missing)} video(s) not found under {args.video_root}: "
                            f"{', '.join(missing[:5])}{more}")
        ctx, device = init_distributed(ctx, args.device)
        configs = _configs(args, policies, device)
    except EvalError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args, ctx, fmt, policies, probes, configs)
    finally:
        if ctx.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(args, ctx: DistContext, fmt: BenchFormat, policies: list[str], probes: list[Probe], configs: dict) -> int:
    from ..engine import StreamingAssistant

    t0 = time.perf_counter()
    streams = group_streams(probes)
    share = split_streams(streams, ctx.world_size)[ctx.rank]
    payload: dict = {"rank": ctx.rank, "error": ""}
    first = configs[policies[0]]
    adapter = None
    if ctx.rank != 0:
        _barrier(ctx)  # rank 0 loads first: a model built or downloaded once, not by every rank at once
    try:
        adapter = StreamingAssistant(first).adapter
    except Exception as exc:  # any failure: this rank must still reach the barrier and the gather
        payload["error"] = f"rank {ctx.rank}: cannot load model {first.model}: {type(exc).__name__}: {exc}"
    if ctx.rank == 0:
        _barrier(ctx)
    if adapter is not None:
        try:
            payload.update(run_share(configs, adapter, share, ctx.rank, max_new_tokens=args.max_new_tokens,
                                     context_s=args.context_s))
        except Exception as exc:  # reported by rank 0; every rank must still reach the gather
            payload["error"] = f"rank {ctx.rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    payload["device"] = str(adapter.device) if adapter is not None else ""
    gathered = gather_to_rank0(ctx, payload)
    if ctx.rank != 0:
        return 0
    errors = [g["error"] for g in gathered if g["error"]]
    if errors:
        for e in errors:
            print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    rows = sorted((r for g in gathered for r in g["probes"]), key=lambda r: (policies.index(r["policy"]), r["order"]))
    totals = {}
    for policy in policies:
        tot = PolicyTotals()
        for g in gathered:
            tot.merge(PolicyTotals(**g["totals"][policy]))
        totals[policy] = tot
    doc = _result_doc(args, ctx, fmt, policies, probes, streams, rows, totals, gathered,
                      wall_s=time.perf_counter() - t0)
    if args.json == "-":
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
    else:
        print_report(doc)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
    return 0


def _result_doc(args, ctx, fmt, policies, probes, streams, rows, totals, gathered, wall_s: float) -> dict:
    scores = score(fmt, rows, policies)
    results = {}
    for policy in policies:
        tot = totals[policy]
        results[policy] = {
            **scores[policy],
            "kv_bytes_peak": tot.kv_bytes_peak,
            "kv_bytes_budget": tot.kv_bytes_budget,
            "ms_per_frame": round(tot.ingest_ms / tot.frames_ingested, 3) if tot.frames_ingested else None,
            "frames_ingested": tot.frames_ingested,
            "frames_read": tot.frames_read,
            "compressions": tot.compressions,
            "videos": tot.videos,
        }
    return {
        "format": fmt.value,
        "items": args.items,
        "model": args.model,
        "settings": {"max_vision_tokens": args.max_tokens, "fps": args.fps, "max_new_tokens": args.max_new_tokens,
                     "max_pixels": args.max_pixels, "context_s": args.context_s, "limit": args.limit},
        "policies": list(policies),
        "world_size": ctx.world_size,
        "backend": ctx.backend,
        "devices": [g["device"] for g in gathered],
        "questions": len(probes),
        "videos": len(streams),
        "tasks": task_order(fmt, rows),
        "results": results,
        "probes": rows,
        "wall_s": round(wall_s, 3),
    }


def print_report(doc: dict, out=None) -> None:
    """Accuracy per task and policy, then per policy: category means, overall, unanswered, peak KV, ms per frame."""
    out = sys.stdout if out is None else out
    policies, results = doc["policies"], doc["results"]
    w = max(12, *(len(p) + 2 for p in policies))
    lw = 26
    s = doc["settings"]
    print(f"{PROG}: {doc['format']} {doc['items']}: {doc['questions']} questions on {doc['videos']} video(s); "
          f"model {doc['model']}, M = {s['max_vision_tokens']} vision tokens, {s['fps']:g} fps, "
          f"{doc['world_size']} process(es)", file=out)
    print(f"{'accuracy % (questions)':<{lw}}" + "".join(f"{p:>{w}}" for p in policies), file=out)

    def line(label: str, vals: Sequence[str]) -> None:
        print(f"{label:<{lw}}" + "".join(f"{v:>{w}}" for v in vals), file=out)

    def pct(x: Optional[float]) -> str:
        return "-" if x is None else f"{x:.1f}"

    for task in doc["tasks"]:
        n = results[policies[0]]["tasks"].get(task, {}).get("n", 0)
        line(f"{task} ({n})", [pct(results[p]["tasks"].get(task, {}).get("accuracy")) for p in policies])
    if doc["format"] == BenchFormat.OVO.value:
        for cat in list(OVO_CATEGORIES) + ["other"]:
            vals = [results[p].get("categories", {}).get(cat) for p in policies]
            if any(v is not None for v in vals):
                line(f"{cat} (mean of tasks)", [pct(v) for v in vals])
        line("overall (mean of tasks)", [pct(results[p]["overall"]) for p in policies])
    else:
        line("overall (all questions)", [pct(results[p]["overall"]) for p in policies])
    line("unanswered", [f"{results[p]['unanswered']}/{results[p]['n']}" for p in policies])
    line("peak KV MB", [f"{results[p]['kv_bytes_peak'] / 1e6:.3f}" for p in policies])
    line("budget KV MB (prefix + M)", [f"{results[p]['kv_bytes_budget'] / 1e6:.3f}" if results[p]["kv_bytes_budget"]
                                       else "none" for p in policies])
    line("ms / frame", [pct(results[p]["ms_per_frame"]) if results[p]["ms_per_frame"] is None
                        else f"{results[p]['ms_per_frame']:.2f}" for p in policies])
    line("compressions", [str(results[p]["compressions"]) for p in policies])

if __name__ == "__main__":
    sys.exit(main())
