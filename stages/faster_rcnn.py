"""Faster R-CNN (Ren et al., NIPS 2015): a region proposal network on the shared conv5, no selective search.

    faster-rcnn           trains torchvision's FasterRCNN with our pretrained trunk, its
                          RegionProposalNetwork (anchors of `anchor_sizes` x `aspect_ratios` at every
                          conv5 cell; objectness + box regression) and Fast R-CNN's RoI heads
                          (pipeline.detectors), jointly: the four losses (RPN objectness and box
                          regression, detector classification and box regression) summed.
    faster-rcnn-detect    detections of the test split from the model's own proposals
                          (rpn_post_nms_test of them; Faster R-CNN: 300).
    faster-rcnn-evaluate  the shared evaluation stage.

The classes are Fast R-CNN's (stages.fast_rcnn) with the RPN in place of the cached proposals.
"""
from __future__ import annotations

from stages.fast_rcnn import FastRCNNDetect, FastRCNNTrain

FASTER_RCNN_VARIANTS = {"faster_rcnn": "Faster R-CNN (RPN + Fast R-CNN, shared conv5)"}


class FasterRCNNTrain(FastRCNNTrain):
    """Train Faster R-CNN (RPN + Fast R-CNN head, four losses) jointly."""

    name = "faster-rcnn"
    section = "faster_rcnn"
    version = "1"
    loss_title = "faster-rcnn: multitask loss"
    uses_proposals = False

    def build(self, net, num_classes: int, params: dict):
        from pipeline.detectors import build_faster_rcnn
        return build_faster_rcnn(net, num_classes, params)


class FasterRCNNDetect(FastRCNNDetect):
    """Detect with the trained Faster R-CNN on the test split, from its own proposals."""

    name = "faster-rcnn-detect"
    version = "1"
    inputs = ("faster-rcnn",)
    trainer = FasterRCNNTrain()
    variants = FASTER_RCNN_VARIANTS

    def models(self, inputs: dict, ctx) -> dict:
        model, _ = self.trainer.load(inputs[self.trainer.name], ctx.device, ctx.config)
        return {"faster_rcnn": model}
