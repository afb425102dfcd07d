"""One module per stage (a method's own stages share its module). REGISTRY maps each stage's name to
it, in pipeline order; METHODS names the stage that ends each method's graph (its evaluation).

SPP-net reuses R-CNN's SVM, box regression, detection and evaluation stages on its own features: the
same classes, as copies named with the prefix "sppnet-" (pipeline.stage.MethodStage).
"""
from stages.bbox import BBox
from stages.detect import Detect
from stages.evaluate import Evaluate
from stages.fast_rcnn import FAST_RCNN_VARIANTS, FastRCNNDetect, FastRCNNTrain
from stages.faster_rcnn import FASTER_RCNN_VARIANTS, FasterRCNNDetect, FasterRCNNTrain
from stages.fcn import FCNEvaluate, FCNTrain, PixelClassifier
from stages.features import Features
from stages.finetune import Finetune
from stages.localize import Localize
from stages.pretrain import Pretrain
from stages.proposals import Proposals
from stages.sppnet import SPPConv5, SPPFeatures, SPPFinetune
from stages.sliding_window import SLIDING_WINDOW_VARIANTS, SlidingWindowDetect
from stages.svm import SVM
from stages.timing_table import TimingTable

SPPNET = "sppnet-"

REGISTRY = {stage.name: stage for stage in (
    Proposals(), Pretrain(), Finetune(), Features(), SVM(), BBox(), Detect(), Evaluate(),
    SPPConv5(), SPPFeatures(), SPPFinetune(), SVM(SPPNET), BBox(SPPNET), Detect(SPPNET), Evaluate(SPPNET),
    FastRCNNTrain(), FastRCNNDetect(), Evaluate("fast-rcnn-", FAST_RCNN_VARIANTS),
    FasterRCNNTrain(), FasterRCNNDetect(), Evaluate("faster-rcnn-", FASTER_RCNN_VARIANTS),
    SlidingWindowDetect(), Evaluate("sliding-window-", SLIDING_WINDOW_VARIANTS, name="sliding-window"),
    TimingTable(),
    FCNTrain(), PixelClassifier(), FCNEvaluate(), Localize(),
)}

METHODS = {"sliding-window": "sliding-window", "rcnn": "evaluate", "sppnet": "sppnet-evaluate", "fast-rcnn": "fast-rcnn-evaluate",
           "faster-rcnn": "faster-rcnn-evaluate"}
# other tasks: `rcnn run --methods fcn` (semantic segmentation, same data); localize needs single-object data
TASKS = {"fcn": "fcn", "localize": "localize"}
