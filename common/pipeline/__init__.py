"""The update pipeline: one ordered list of stages from the site's delta to the server's step.

Built by :func:`common.pipeline.build.build_pipeline`; the stages are in ``stages/``.
Imports nothing from ``server/`` or ``client/``.
"""

from common.pipeline.base import Aggregate, Pipeline, ServerContext, SiteContext, SiteUpdate, Stage
from common.pipeline.build import build_pipeline

__all__ = ["Aggregate", "Pipeline", "ServerContext", "SiteContext", "SiteUpdate", "Stage", "build_pipeline"]
