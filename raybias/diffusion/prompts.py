"""Group prompts: a class named by one of its members (as FFR draws a breed) and the bias word.

"a {bias} {member}" with class 1 = digits 5-9 and bias "green" gives e.g. "a green seven".
DreamBooth inserts its identifier token right before the first of {bias}/{member} ("a sks
green seven"), or where the template says `{identifier}`. Deterministic given the rng.
"""

from __future__ import annotations

import random
import re
from typing import List, Optional, Union

import numpy as np

Rng = Union[np.random.Generator, random.Random]


def _pick(rng: Rng, words: List[str]) -> str:
    if isinstance(rng, random.Random):
        return rng.choice(words)
    return words[int(rng.integers(len(words)))]


def group_prompt(info, group: int, member_rng: Rng, identifier: Optional[str] = None,
                 bias_override: Optional[str] = None) -> str:
    """The prompt for one image of `group` (DatasetInfo `info`)."""
    y, a = info.y_a(group)
    members = list(info.class_words[y])
    if not members:
        raise ValueError(f"class {y} has no words to name it (data.class_words)")
    member = _pick(member_rng, members)
    bias = bias_override if bias_override is not None else info.bias_words[a]
    template = info.prompt_template
    if "{identifier}" in template:
        text = template.format(member=member, bias=bias, identifier=identifier or "")
    else:
        if identifier:
            positions = [template.find(k) for k in ("{bias}", "{member}") if k in template]
            at = min(positions) if positions else len(template)
            template = template[:at] + identifier + " " + template[at:]
        text = template.format(member=member, bias=bias)
    return re.sub(r"\s+", " ", text).strip()


def group_prompts(info, group: int, n: int, seed: int, identifier: Optional[str] = None,
                  bias_override: Optional[str] = None) -> List[str]:
    """`n` prompts for `group`, members drawn by `np.random.default_rng(seed)`."""
    rng = np.random.default_rng(seed)
    return [group_prompt(info, group, rng, identifier, bias_override) for _ in range(n)]


def class_prompt(info, y: int, member_rng: Rng) -> str:
    """A prompt naming only the class (no bias word), e.g. for the filter's class score."""
    member = _pick(member_rng, list(info.class_words[y]))
    text = info.prompt_template.replace("{identifier}", "").replace("{bias}", "")
    return re.sub(r"\s+", " ", text.format(member=member)).strip()
