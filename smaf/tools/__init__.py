"""Small tools around the project that are not part of the pipeline (``python -m smaf.tools.<name>``)."""
