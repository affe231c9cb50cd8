"""SSDLite object detection on any MnasNet backbone (paper section 6.3; the MobileNetV2 paper's
SSDLite, as the TF Object Detection API's ssdlite_mobilenet_v2_coco config defines it).

One idea a module: `anchors` (the SSD anchor grid), `boxes` (IoU, box coding, matching),
`ssdlite` (the feature extractor and predictors on the project's MnasNet, and their size),
`loss` (smooth L1 + sigmoid classification with hard negative mining), `nms` (post-processing),
`data` (COCO 2017 through TFDS, Fashion-MNIST canvases, SSD augmentation), `metric` (COCO mAP),
`job` (the 'detect' train/eval job), `export` (TFLite).
"""
