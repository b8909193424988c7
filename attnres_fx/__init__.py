"""attnres_fx: Block Attention Residuals (arXiv 2603.15031) applied as a compiler pass.

model = attnres_fx.transform(model)   # before torch.compile
print(attnres_fx.plan(model))
"""

from .api import depth_weights, from_pretrained, plan, transform
from .errors import AttnResError
from .parallel import SequenceParallelDepth
from .pipeline import pipeline_split, pipeline_stage, pipeline_stages
from .plan import Plan, PlanSite

__all__ = [
    "AttnResError",
    "Plan",
    "PlanSite",
    "SequenceParallelDepth",
    "depth_weights",
    "from_pretrained",
    "pipeline_split",
    "pipeline_stage",
    "pipeline_stages",
    "plan",
    "transform",
]
__version__ = "0.1.0"
