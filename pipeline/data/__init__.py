"""Data sets: the PASCAL VOC layout, COCO json and the YOLO layout (formats.open_dataset picks the reader),
the shapes generator and conversion between formats. Knows nothing of stages or models."""
from pipeline.data.voc import VOCDataset
from pipeline.data.reader import VOCAnnotation, VOCObject

__all__ = ["VOCAnnotation", "VOCDataset", "VOCObject"]
