"""What may vary in a search. A Space turns an Optuna trial into a Recipe.

Spaces are registered by name (`SPACES`); `--space formats,sparsity` joins several.
"""

from llmpareto.spaces.base import SPACES, Space, build_space
from llmpareto.spaces.formats import FormatSpace
from llmpareto.spaces.joint import JointSpace
from llmpareto.spaces.sparsity import SparsitySpace
from llmpareto.spaces.students import StudentSpace

__all__ = ["SPACES", "FormatSpace", "JointSpace", "Space", "SparsitySpace", "StudentSpace",
           "build_space"]
