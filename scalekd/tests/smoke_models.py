"""The smoke profile's small models as overrides (the same as paper.yaml's reproduce.smoke runs)."""

TEACHER = ["model.teacher=swin", "model.teacher_kwargs={embed_dim:32,depths:[1,1,2,1],num_heads:[1,2,4,8],"
           "patch_size:2,window_size:4,img_size:64}"]
STUDENT = ["model.student=resnet", "model.student_kwargs={depth:18,base_channels:16,stem_channels:16}"]
CAPS = ["method.cap_variant=v1", "method.s3.num_heads=4", "method.s4.num_heads=8"]
TINY_DATA = ["data.train_per_class=2", "data.val_per_class=2", "trainer.global_batch=4"]
