"""Worked examples, importable as plug-ins (`--model hvdtrain.examples.digits_cnn:DigitsCNN`) or from
a script (`from hvdtrain.examples.digits_cnn import DigitsCNN, digits_datasets`)."""
