print("minimal driver")
