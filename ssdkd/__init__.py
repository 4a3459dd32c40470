"""ssdkd"""
