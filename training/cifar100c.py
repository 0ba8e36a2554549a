"""What CIFAR-100-C is (Hendrycks & Dietterich, 2019): the CIFAR-100 test set under 19 corruptions, each
<corruption>.npy uint8 [50000, 32, 32, 3] (severity 1..5 in blocks of 10,000), with one labels.npy [50000] for them
all. The course's Kaggle test set has the same layout. RobustBench reports the mean over the first 15 ("common")
corruptions. (No torch here: the scoring client imports it.)
"""
URL = "https://zenodo.org/records/3555552/files/CIFAR-100-C.tar"
MD5 = "11f0ed0f1191edbf9fa23466ae6021d3"   # published with the archive
FOLDER = "CIFAR-100-C"
COMMON_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
                      "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
                      "jpeg_compression")
CORRUPTIONS = COMMON_CORRUPTIONS + ("gaussian_blur", "saturate", "spatter", "speckle_noise")
SEVERITIES = 5
