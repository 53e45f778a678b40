"""Edit records from EasyEdit's data formats (ZsRE, CounterFact, hallucination, temporal)."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence, Union

DEMO_DATA = Path(__file__).resolve().parent.parent / "data" / "demo_edits.json"


class RecordError(ValueError):
    """An edit data file or record that cannot be read (the message names the file and record)."""


@dataclass(frozen=True)
class EditRecord:
    prompt: str
    subject: str
    target: str
    rephrase: Optional[str] = None
    locality_prompt: Optional[str] = None
    locality_answer: Optional[str] = None
    ground_truth: Optional[str] = None

    def request(self) -> Dict[str, Any]:
        """The request dict EasyEdit passes to ``apply_*_to_model``."""
        request: Dict[str, Any] = {"prompt": self.prompt, "subject": self.subject, "target_new": self.target}
        if self.ground_truth is not None:
            request["ground_truth"] = self.ground_truth
        if self.rephrase is not None:
            request["rephrase_prompt"] = self.rephrase
        return request


def _first(value: Any) -> Optional[str]:
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, Mapping):
        value = value.get("str")
    return value if isinstance(value, str) and value.strip() else None


def record_from_dict(raw: Mapping[str, Any], source: str = "", require_target: bool = True) -> EditRecord:
    """Accepts ZsRE keys (src/alt/rephrase/loc/loc_ans) and CounterFact/WISE keys (prompt/target_new/...).

    ``require_target=False`` accepts a record without an edit target, for callers that
    read only its locality pair (WISE's unrelated text from a training split).
    """
    if "src" in raw:
        # The locality prompt keeps its "nq question: " prefix, as EasyEdit's ZsRE loader does.
        loc = raw.get("loc")
        record = EditRecord(
            prompt=raw["src"],
            subject=raw.get("subject", ""),
            target=_first(raw.get("alt")) or "",
            rephrase=_first(raw.get("rephrase")),
            locality_prompt=_first(loc),
            locality_answer=_first(raw.get("loc_ans")),
            ground_truth=_first(raw.get("answers")) or _first(raw.get("pred")),
        )
    elif "prompt" in raw:
        record = EditRecord(
            prompt=raw["prompt"],
            subject=raw.get("subject", ""),
            target=_first(raw.get("target_new")) or "",
            rephrase=_first(raw.get("rephrase_prompt")) or _first(raw.get("ood_rephrase")),
            locality_prompt=_first(raw.get("locality_prompt")),
            locality_answer=_first(raw.get("locality_ground_truth")),
            ground_truth=_first(raw.get("ground_truth")),
        )
    else:
        raise RecordError(f"{source}: record has neither 'src' (ZsRE) nor 'prompt' (CounterFact) keys: {sorted(raw)}")
    if require_target and not record.target:
        raise RecordError(f"{source}: record with prompt {record.prompt!r} has an empty target")
    # CounterFact-style templates: the texts evaluated are the ones edited, subject filled in.
    # (Two placeholders stay as they are: the edit refuses them by name.)
    if record.subject and record.prompt.count("{}") == 1:
        record = replace(record, prompt=record.prompt.replace("{}", record.subject))
    if record.subject and record.rephrase and record.rephrase.count("{}") == 1:
        record = replace(record, rephrase=record.rephrase.replace("{}", record.subject))
    return record


def load_records(
    paths: Sequence[Union[str, Path]], limit: Optional[int] = None, require_target: bool = True
) -> List[EditRecord]:
    """Records from one or more JSON files, in order; the project's demo set when none is given."""
    if limit is not None and limit < 1:
        raise RecordError(f"the number of edits must be at least 1, got {limit}")
    records: List[EditRecord] = []
    for path in paths or [DEMO_DATA]:
        try:
            with open(path, "r", encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, list):
            raise RecordError(f"{path}: expected a JSON list of edit records")
        for i, item in enumerate(raw):
            records.append(record_from_dict(item, source=f"{path}[{i}]", require_target=require_target))
            if limit is not None and len(records) >= limit:
                return records
    return records


def locality_texts(path: Union[str, Path], exclude_prompts: Collection[str] = ()) -> List[str]:
    """``"<locality prompt> <answer>"`` of every record in ``path`` that has both.

    WISE trains its router against such unrelated text from a dataset's training split;
    records there may lack an edit target (some ZsRE train records do), which does not
    matter for their locality pair.  ``exclude_prompts``: locality prompts the run scores
    (when the split is also edited, as ZsRE's is beyond the dev file), left out so the
    router never trains on a question it is evaluated on.
    """
    excluded = set(exclude_prompts)
    return [
        f"{r.locality_prompt} {r.locality_answer}"
        for r in load_records([path], require_target=False)
        if r.locality_prompt and r.locality_answer and r.locality_prompt not in excluded
    ]
