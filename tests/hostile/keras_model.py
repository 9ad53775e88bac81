"""A Keras 3 model on the torch backend: importing Keras runs torch ops (on 178d663 every
trial then hung). ``keras.Model`` on the torch backend is an ``nn.Module``."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras


def make_model():
    return keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)]
    )
