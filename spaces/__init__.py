"""What may vary in a search. A Space turns an Optuna trial into a Recipe.

Spaces are registered by name (`SPACES`); `--space formats,sparsity` joins several.
"""

from llmpareto.spaces.base import SPACES, Space, build_space
from llmpareto.spaces.formats import FormatSpace
from llmpareto.spaces.sparsity import JointSpace, SparsitySpace

__all__ = ["SPACES", "FormatSpace", "JointSpace", "Space", "SparsitySpace", "build_space"]
