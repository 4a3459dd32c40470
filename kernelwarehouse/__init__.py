"""kernelwarehouse"""
