"""The data layer: data sets into host memory, host batches, on-device augmentation.

    registry     the data sets `data.name` names: loader, number of classes, image shape, splits
    dataset      the in-memory Dataset, its validation hold-out and channel statistics
    tfds_source  tfds data sets (array_record, no TensorFlow to read); CIFAR-10/100 prepared from their archives
    folder       image folders, train/<class>/ and test/<class>/
    images       one image file to uint8 RGB (folders and --mode predict)
    pipeline     batches as pure functions of (seed, step), augmentation and normalisation, Mixup/CutMix
    tfds_writer  real-format tfds data sets written offline

It imports nothing of training, the device layout or the modes.
"""
