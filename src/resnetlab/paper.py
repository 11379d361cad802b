"""The paper's published figures, in one place, so tables and reports can set measurements beside them."""

# Table 1: multiply-adds (GFLOPs in the paper) of the ImageNet nets, stride-2 on a bottleneck's first 1x1.
IMAGENET_GFLOPS = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}

# Table 6: CIFAR-10 networks (option A): parameters (millions) and test error (%). 110: best of 5 runs is 6.43,
# the mean is 6.61 +- 0.16.
CIFAR_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}
CIFAR_TEST_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
# The best-known PyTorch reproduction of Table 6 (Yerlan Idelbayev's pytorch_resnet_cifar10, official pixels,
# the paper's schedule): CIFAR-10 test error (%).
CIFAR_REPRODUCTION_TEST_ERROR = {20: 8.27, 32: 7.37, 44: 6.90, 56: 6.61, 110: 6.32, 1202: 6.18}

# Table 3: ImageNet validation top-1 error (%, 10-crop) of ResNet-34 with shortcut options A/B/C, and plain-34.
SHORTCUT_TOP1_ERROR = {"plain": 28.54, "A": 25.03, "B": 24.52, "C": 24.19}
SHORTCUT_TOP5_ERROR = {"plain": 10.02, "A": 7.76, "B": 7.46, "C": 7.40}
# Table 4: ImageNet validation top-1 error (%) of single ResNet-34s under the fully-convolutional multi-scale test.
MULTISCALE_ERROR = {"B": 21.84, "C": 21.53}

# Table 2: ImageNet validation top-1 error (%, 10-crop) of the 18- and 34-layer plain nets and ResNets (option A).
IMAGENET_TOP1_ERROR = {"plain18": 27.94, "plain34": 28.54, "resnet18": 27.88, "resnet34": 25.03}
