"""Column schema of the UCI Adult census data: names, kinds, label and weight."""

from __future__ import annotations

from dataclasses import dataclass

NUMERIC = "numeric"
CATEGORICAL = "categorical"


@dataclass(frozen=True)
class Column:
    """One column of the Adult files: name, kind and header aliases.

    A numeric column parses to Float64 and a categorical one to String, with
    `?` read as null.
    """

    name: str
    kind: str
    aliases: tuple[str, ...] = ()


# File order of the 15 comma-separated fields in adult.data and adult.test.
COLUMNS: tuple[Column, ...] = (
    Column("age", NUMERIC),
    Column("workclass", CATEGORICAL),
    Column("fnlwgt", NUMERIC, ("final_weight",)),
    Column("education", CATEGORICAL),
    Column("education_num", NUMERIC, ("educational_num",)),
    Column("marital_status", CATEGORICAL),
    Column("occupation", CATEGORICAL),
    Column("relationship", CATEGORICAL),
    Column("race", CATEGORICAL),
    Column("sex", CATEGORICAL, ("gender",)),
    Column("capital_gain", NUMERIC),
    Column("capital_loss", NUMERIC),
    Column("hours_per_week", NUMERIC),
    Column("native_country", CATEGORICAL, ("country",)),
    Column("income", CATEGORICAL, ("class", "label", "income_bracket", "salary")),
)

LABEL = "income"
NEGATIVE_CLASS = "<=50K"
POSITIVE_CLASS = ">50K"
CLASSES = (NEGATIVE_CLASS, POSITIVE_CLASS)

# The census sampling weight: how many people a row stands for. It is a sample
# weight, not a feature of the person, so the model never reads it as input.
WEIGHT = "fnlwgt"

# The 14 columns a client sends, in file order (everything but the label).
FEATURE_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.name != LABEL)
CATEGORICAL_FEATURES: tuple[str, ...] = tuple(
    c.name for c in COLUMNS if c.kind == CATEGORICAL and c.name != LABEL
)
NUMERIC_FEATURES: tuple[str, ...] = tuple(
    c.name for c in COLUMNS if c.kind == NUMERIC and c.name != WEIGHT
)
# Numeric columns that may never be negative in a valid row.
NON_NEGATIVE = (
    "age",
    "fnlwgt",
    "education_num",
    "capital_gain",
    "capital_loss",
    "hours_per_week",
)
# Heavy-tailed money columns; the model reads log1p of them.
LOG_SCALED = ("capital_gain", "capital_loss")

# The value the UCI files use for a missing category.
MISSING = "?"

_BY_NAME = {c.name: c for c in COLUMNS}


def normalize_name(raw: str) -> str:
    """Map a header name or alias (`Gender`, `marital-status`) to its column name.

    Case is ignored, and hyphens, dots and spaces count as underscores.

    Raises:
        ValueError: the name is not a known column or alias.
    """
    key = raw.strip().lower().replace("-", "_").replace(" ", "_").replace(".", "_")
    if key in _BY_NAME:
        return key
    for column in COLUMNS:
        if key in column.aliases:
            return column.name
    raise ValueError(f"Unknown column name {raw!r}. {accepted_names()}")


def accepted_names() -> str:
    """Describe the column names and aliases a header row may use."""
    known = ", ".join(c.name for c in COLUMNS)
    aliases = ", ".join(f"{alias} for {c.name}" for c in COLUMNS for alias in c.aliases)
    return (
        f"Accepted names: {known}; aliases: {aliases}. Case is ignored and "
        "hyphens, dots or spaces may replace underscores."
    )


def kind_of(name: str) -> str:
    """Return `numeric` or `categorical` for a column name."""
    return _BY_NAME[name].kind
