"""Baseline servers that every lmgate benchmark claim is measured against."""
