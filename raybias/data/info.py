"""`data/info.json`: what every later stage needs to know about the prepared dataset."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

from raybias.layout import INFO, PREPARE_KEY
from raybias.rundir import RunDir, StageFailed

_JSON_TYPES = {"int": (int,), "str": (str,), "float": (int, float), "bool": (bool,), "List": (list,), "Dict": (dict,)}


def _wrong_type(annotation: str, value: Any) -> bool:
    """Does a JSON value not fit a field annotated `annotation` (e.g. "Optional[float]")?"""
    if annotation.startswith("Optional["):
        if value is None:
            return False
        annotation = annotation[len("Optional["):-1]
    kinds = _JSON_TYPES.get(annotation.split("[", 1)[0])
    if kinds is None:
        return False
    return not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)


@dataclass
class DatasetInfo:
    source: str
    n_classes: int
    n_bias: int
    class_names: List[str]
    bias_names: List[str]
    class_words: List[List[str]]
    bias_words: List[str]
    prompt_template: str
    aligned: List[int]
    image_size: int
    severity: Optional[float]
    counts: Dict[str, Dict[str, int]] = field(default_factory=dict)  # split -> group -> n
    empty_train_groups: List[int] = field(default_factory=list)
    # data.val_protocol the validation split was prepared with (raybias/data/severity.py);
    # an info.json written before the key existed had its validation split untouched.
    val_protocol: str = "untouched"

    def protocol_line(self) -> str:
        """One line: the severity rule and the validation protocol this data was prepared with."""
        from raybias.data.severity import SEVERITY_RULE, VAL_PROTOCOL_TEXT

        if self.severity is None:
            return "Severity: original (the data as shipped, nothing subsampled); test untouched."
        val = VAL_PROTOCOL_TEXT.get(self.val_protocol, self.val_protocol)
        return (f"Severity {self.severity:g}: {SEVERITY_RULE}; val_protocol {self.val_protocol}: {val}; "
                "test untouched.")

    @property
    def n_groups(self) -> int:
        return self.n_classes * self.n_bias

    def group_of(self, y: int, a: int) -> int:
        return y * self.n_bias + a

    def y_a(self, group: int):
        return divmod(int(group), self.n_bias)

    def group_name(self, group: int) -> str:
        y, a = self.y_a(group)
        return f"{self.class_names[y]}/{self.bias_names[a]}"

    def is_aligned(self, group: int) -> bool:
        y, a = self.y_a(group)
        return self.aligned[y] == a

    def train_count(self, group: int) -> int:
        return int(self.counts.get("train", {}).get(str(group), 0))

    def save(self, run: RunDir) -> None:
        run.write_json(INFO, asdict(self))

    @classmethod
    def load(cls, run: RunDir) -> "DatasetInfo":
        run.require(PREPARE_KEY)  # what prepare recorded is still whole
        if not run.exists(INFO):
            raise FileNotFoundError(f"{run.path(INFO)} does not exist (run `raybias prepare` first)")
        data = run.read_json(INFO)
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        if not isinstance(data, dict) or not required <= set(data) or not set(data) <= names:
            what = (f"a JSON {type(data).__name__}" if not isinstance(data, dict)
                    else f"missing {sorted(required - set(data))}" if not required <= set(data)
                    else f"unknown keys {sorted(set(data) - names)}")
            raise StageFailed(f"{run.path(INFO)} is damaged ({what}); run `raybias prepare` again")
        wrong = [f.name for f in fields(cls) if f.name in data and _wrong_type(str(f.type), data[f.name])]
        if wrong:
            raise StageFailed(f"{run.path(INFO)} is damaged (wrong type for {', '.join(wrong)}); "
                              "run `raybias prepare` again")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise StageFailed(f"{run.path(INFO)} is damaged ({exc}); run `raybias prepare` again") from exc
