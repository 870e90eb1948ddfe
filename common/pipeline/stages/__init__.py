"""The update pipeline's stages, one per file; :mod:`common.pipeline.build` puts them in order."""
