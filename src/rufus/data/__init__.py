"""Data: read datasets (Rufus's own rows, or a published data set as it is), validate them per kind
(sft, preference, ranking, prompt, graded, comparison), tokenise them.

Every problem with the data raises `DataError`, naming the config key, the file, the row or line and
the field, before any training starts. Heavy libraries (datasets, torch) load on first use.
"""

from rufus.data.errors import DataError
from rufus.data.formats import KINDS, split_implicit_prompt
from rufus.data.loading import Records, load_records
from rufus.data.readers import FORMAT_NAMES, ReadOptions, options_from
from rufus.data.reward import RewardCollator, encode_for_reward, tokenize_comparisons, tokenize_graded
from rufus.data.sft import (
    IGNORE_INDEX,
    TRUNCATION,
    LengthPolicy,
    SFTCollator,
    encode_prompt,
    render_prompt,
    tokenize_sft,
)

__all__ = [
    "FORMAT_NAMES",
    "IGNORE_INDEX",
    "KINDS",
    "TRUNCATION",
    "DataError",
    "LengthPolicy",
    "ReadOptions",
    "Records",
    "RewardCollator",
    "SFTCollator",
    "encode_for_reward",
    "encode_prompt",
    "load_records",
    "options_from",
    "render_prompt",
    "split_implicit_prompt",
    "tokenize_comparisons",
    "tokenize_graded",
    "tokenize_sft",
]
