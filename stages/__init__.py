"""One module per stage. REGISTRY maps each stage's name to it, in pipeline order."""
from stages.bbox import BBox
from stages.detect import Detect
from stages.evaluate import Evaluate
from stages.features import Features
from stages.finetune import Finetune
from stages.pretrain import Pretrain
from stages.proposals import Proposals
from stages.svm import SVM

REGISTRY = {stage.name: stage for stage in (Proposals(), Pretrain(), Finetune(), Features(), SVM(), BBox(),
                                            Detect(), Evaluate())}
