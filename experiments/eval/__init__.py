"""How good are a backbone's features? The standard answers, each a test score:

    knn.py        weighted k-NN on frozen features (accuracy)
    linear.py     linear probes on frozen, standardised features (accuracy; mean AUC for multi-label)
    finetune.py   the whole backbone plus a head, trained on (a fraction of) the labels
    features.py   frozen features;  metrics.py  accuracy, ROC AUC;  checks.py  input checks
"""
from experiments.eval.features import extract_features, module_device
from experiments.eval.finetune import fine_tune, fine_tune_multilabel
from experiments.eval.knn import knn_accuracy, knn_predict
from experiments.eval.linear import linear_probe, linear_probe_multilabel
from experiments.eval.metrics import accuracy, mean_auc, roc_auc

__all__ = ["extract_features", "module_device", "knn_accuracy", "knn_predict", "linear_probe",
           "linear_probe_multilabel", "fine_tune", "fine_tune_multilabel", "accuracy", "mean_auc", "roc_auc"]
