"""Hydra config groups shipped with dlrun (a package so that Hydra finds them installed or editable)."""
