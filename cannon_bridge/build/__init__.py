"""From the surveys' archives to a training set: catalogues matched and labelled (:mod:`.catalogues`,
:mod:`.labels`)."""
from .catalogues import CatalogueMatch, match_catalogues
from .labels import DEFAULT_LABEL_SOURCES, CatalogueLabels, LabelSource, catalogue_labels, read_label_sources

__all__ = ["DEFAULT_LABEL_SOURCES", "CatalogueLabels", "CatalogueMatch", "LabelSource", "catalogue_labels",
           "match_catalogues", "read_label_sources"]
