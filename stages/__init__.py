"""One module per stage (or per kind of stage a method shares). REGISTRY maps each stage's name to it,
in pipeline order. A method's record (pipeline.methods) names its stages; every method has its
`<method>-detect` and `<method>-evaluate`, one class each (stages.detect, stages.evaluate), run on its
own detector. SPP-net reuses R-CNN's SVM and box-regression stages on its own features, as copies
named with the prefix "sppnet-" (pipeline.engine.stage.PrefixedStage). No module here imports another.
"""
from pipeline.methods import METHODS, TASKS
from stages.bbox import BBox
from stages.detect import Detect
from stages.detector_train import DetectorTrain
from stages.evaluate import Evaluate
from stages.fcn import FCNEvaluate, FCNTrain
from stages.features import Features
from stages.finetune import Finetune
from stages.localize import Localize
from stages.pixel_classifier import PixelClassifier
from stages.pretrain import Pretrain
from stages.proposals import Proposals
from stages.sppnet import SPPConv5, SPPFeatures, SPPFinetune
from stages.svm import SVM
from stages.timing_table import TimingTable
from stages.timing_test_only import TestOnlyTiming

SPPNET_PREFIX = "sppnet-"

# what `rcnn run --methods NAME` ends with: each method's evaluation, and the other tasks' last stages
ENDS = {**{name: method.evaluate_stage for name, method in METHODS.items()}, **TASKS}
# every stage a config can run, planned target by target (`rcnn status`, `rcnn verify`)
ALL_TARGETS = [*(method.evaluate_stage for method in METHODS.values()), TimingTable.name, *TASKS.values()]

REGISTRY = {stage.name: stage for stage in (
    Proposals(), Pretrain(), Finetune(), Features(), SVM(), BBox(),
    SPPConv5(), SPPFeatures(), SPPFinetune(), SVM(SPPNET_PREFIX), BBox(SPPNET_PREFIX),
    *(DetectorTrain(method) for method in METHODS.values() if method.end_to_end),
    *(stage for method in METHODS.values() for stage in (Detect(method), Evaluate(method))),
    TimingTable(), TestOnlyTiming(),
    FCNTrain(), PixelClassifier(), FCNEvaluate(), Localize(),
)}
