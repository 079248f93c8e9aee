"""From the surveys' archives to a training set (:func:`build_crossmatch`): catalogues matched and labelled
(:mod:`.catalogues`, :mod:`.labels`), spectra found in the download cache and put on the model grids
(:mod:`.spectra`)."""
from .assemble import BuildResult, build_crossmatch
from .catalogues import CatalogueMatch, match_catalogues
from .labels import DEFAULT_LABEL_SOURCES, CatalogueLabels, LabelSource, catalogue_labels, read_label_sources

__all__ = ["BuildResult", "build_crossmatch", "DEFAULT_LABEL_SOURCES", "CatalogueLabels", "CatalogueMatch",
           "LabelSource", "catalogue_labels", "match_catalogues", "read_label_sources"]
