# The compiled fast lane is engine/nfs/fastlane.py itself, built by Cython.
from engine.nfs.fastlane import FastLane as FastLane
