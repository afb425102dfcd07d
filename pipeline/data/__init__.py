"""Data sets in the PASCAL VOC layout. Knows nothing of stages or models."""
from pipeline.data.voc import VOCAnnotation, VOCDataset, VOCObject

__all__ = ["VOCAnnotation", "VOCDataset", "VOCObject"]
