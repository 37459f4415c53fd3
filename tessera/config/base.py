"""The base of every config section: strict, typed, and loud about mistakes."""
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# An image side in pixels: whole VQ patches of 16 pixels (256 and 512 in LlamaGen's recipe).
Resolution = Annotated[int, Field(gt=0, multiple_of=16)]


class Section(BaseModel):
    """A config section. Unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
