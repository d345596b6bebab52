"""The package version, kept in one place for pyproject, reports and metadata_props."""

__version__ = "0.9.0"
