"""One module per stage. REGISTRY maps each stage's name to it, in pipeline order."""
from stages.proposals import Proposals

REGISTRY = {stage.name: stage for stage in (Proposals(),)}
