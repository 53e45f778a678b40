"""Edit records from EasyEdit's data formats (ZsRE, CounterFact, hallucination, temporal)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

DEMO_DATA = Path(__file__).resolve().parent.parent / "data" / "demo_edits.json"


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


def record_from_dict(raw: Mapping[str, Any], source: str = "") -> EditRecord:
    """Accepts ZsRE keys (src/alt/rephrase/loc/loc_ans) and CounterFact/WISE keys (prompt/target_new/...)."""
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
        raise ValueError(f"{source}: record has neither 'src' (ZsRE) nor 'prompt' (CounterFact) keys: {sorted(raw)}")
    if not record.target:
        raise ValueError(f"{source}: record with prompt {record.prompt!r} has an empty target")
    return record


def load_records(paths: Sequence[Union[str, Path]], limit: Optional[int] = None) -> List[EditRecord]:
    """Records from one or more JSON files, in order; the project's demo set when none is given."""
    records: List[EditRecord] = []
    for path in paths or [DEMO_DATA]:
        with open(path, "r", encoding="utf-8") as f:
            raw = json.load(f)
        if not isinstance(raw, list):
            raise ValueError(f"{path}: expected a JSON list of edit records")
        for i, item in enumerate(raw):
            records.append(record_from_dict(item, source=f"{path}[{i}]"))
            if limit is not None and len(records) >= limit:
                return records
    return records
